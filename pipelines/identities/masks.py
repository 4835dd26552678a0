"""Inpainting masks for real identity exemplars.

MAUGen keeps an exemplar photo's background, hair and clothes and regenerates the face region, so
every real exemplar needs a float32 (H, W) mask, 1 where the face is to be generated. `FaceMasker`
makes one from, in order of preference (mode "auto"):

1. a **user mask** for the identity, when the pool gives one (any H x W bool / uint8 / float array;
   resized with nearest-neighbour to the photo's size when it differs);
2. a **face detector**: OpenCV's frontal-face Haar cascade, `haarcascade_frontalface_default.xml`
   from `cv2.data.haarcascades`. The mask is a filled ellipse around the largest face box, scaled by
   `expand` (so it reaches from the brows to the chin), clipped to the image, binary (not softened);
3. otherwise the exemplar is **skipped**: `FaceNotFound` (a ValueError naming the exemplar) is raised
   and the caller records the name and moves on; a shard never crashes on one bad photo.

Mode "ellipse" always gives a centred ellipse (0.55 of the width, 0.7 of the height, centre slightly
above the middle: about 30% of the image) without looking at the photo: for pools of aligned,
cropped faces, or as an explicit fallback. `ExemplarMask.source` says which path made each mask, so
the build's stats can count user / detector / ellipse masks and skipped exemplars.

Why a Haar cascade: its XML ships inside the `opencv-python-headless` wheel (nothing is downloaded
at run time, so it works offline, in CI and on air-gapped clusters), it runs on the CPU in a few
milliseconds per photo, and with fixed parameters (grayscale, histogram-equalised input,
scaleFactor 1.1, minNeighbors 5) its result is a deterministic function of the pixels. OpenCV 5
dropped the cascades from its main wheels, hence the `<5` pin in pyproject.

Its limits: it finds upright **frontal** faces only. Profile or strongly turned faces, heavy
occlusion, faces smaller than `min_face` of the shorter side and very dark or blurred photos are not
found; such exemplars are skipped and counted (give them a user mask to keep them). Its box is the
central face (brows to mouth); `expand` widens it to the chin and the cheeks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from PIL import Image

MaskSource = Literal["user", "detector", "ellipse"]
MaskMode = Literal["auto", "user", "detector", "ellipse"]

#: the cascade file inside cv2.data.haarcascades
CASCADE_FILE = "haarcascade_frontalface_default.xml"
#: detectMultiScale parameters, fixed so results are deterministic
SCALE_FACTOR = 1.1
MIN_NEIGHBORS = 5
#: the centred ellipse of mode "ellipse": full width and height as fractions of the image, centre
CENTRED_WIDTH = 0.55
CENTRED_HEIGHT = 0.70
CENTRED_CY = 0.46  # slightly above the middle (faces in portraits sit high)


@dataclass(frozen=True)
class ExemplarMask:
    """An exemplar's inpainting mask: float32 (H, W) in {0, 1}, 1 = region to generate; `source` is
    the path that made it; `box` is the detected face box (x, y, w, h) in pixels, None unless
    `source == "detector"`."""

    mask: np.ndarray
    source: MaskSource
    box: tuple[int, int, int, int] | None


class FaceNotFound(ValueError):
    """No usable face in an exemplar photo: the caller skips the exemplar and records `name`."""

    def __init__(self, name: str, detail: str = ""):
        self.name = name
        self.detail = detail
        msg = f"no face found in exemplar {name!r}"
        super().__init__(f"{msg}: {detail}" if detail else msg)

    def __reduce__(self):  # keeps `name` through pickling (Ray ships exceptions between processes)
        return (type(self), (self.name, self.detail))


def ellipse_mask(h: int, w: int, box: tuple[int, int, int, int] | None = None, expand: float = 1.35) -> np.ndarray:
    """Float32 (h, w) filled ellipse, 1 inside (pixel centres), clipped to the image.

    With `box` (x, y, bw, bh): the ellipse inscribed in the box, both axes scaled by `expand` about
    the box centre. Without: the centred ellipse (CENTRED_WIDTH x CENTRED_HEIGHT of the image, centre
    at CENTRED_CY of the height); `expand` is not used then.
    """
    h, w = int(h), int(w)
    if h < 1 or w < 1:
        raise ValueError(f"mask size must be positive, got {h}x{w}")
    if not (math.isfinite(expand) and expand > 0):
        raise ValueError(f"expand must be a positive number, got {expand!r}")
    if box is None:
        cx, cy = w / 2.0, CENTRED_CY * h
        ax, ay = CENTRED_WIDTH * w / 2.0, CENTRED_HEIGHT * h / 2.0
    else:
        x, y, bw, bh = (float(v) for v in box)
        if bw <= 0 or bh <= 0:
            raise ValueError(f"box (x, y, w, h) must have positive width and height, got {tuple(box)}")
        cx, cy = x + bw / 2.0, y + bh / 2.0
        ax, ay = expand * bw / 2.0, expand * bh / 2.0
    xs = (np.arange(w, dtype=np.float64) + 0.5 - cx) / ax
    ys = (np.arange(h, dtype=np.float64) + 0.5 - cy) / ay
    return ((xs[None, :] ** 2 + ys[:, None] ** 2) <= 1.0).astype(np.float32)


class FaceMasker:
    """Makes `ExemplarMask`s for exemplar photos; see the module docstring for the order of sources.

    mode: "auto" (user mask, else detector, else FaceNotFound), "user" (a user mask is required),
    "detector" (the detector only; a given user mask is ignored), "ellipse" (the centred ellipse
    always; the photo and any user mask are ignored).
    min_face: smallest face side accepted, as a fraction of the photo's shorter side.
    expand: the detector ellipse's axes as a multiple of the face box's.
    """

    def __init__(self, mode: MaskMode = "auto", min_face: float = 0.15, expand: float = 1.35):
        if mode not in get_args(MaskMode):
            raise ValueError(f"mask mode must be one of {list(get_args(MaskMode))}, got {mode!r}")
        if not (isinstance(min_face, (int, float)) and 0.0 < min_face <= 1.0):
            raise ValueError(f"min_face must be in (0, 1] (a fraction of the shorter image side), got {min_face!r}")
        if not (isinstance(expand, (int, float)) and math.isfinite(expand) and expand > 0):
            raise ValueError(f"expand must be a positive number, got {expand!r}")
        self.mode = mode
        self.min_face = float(min_face)
        self.expand = float(expand)
        self._cascade = None  # loaded on first detector use

    def __call__(self, image: np.ndarray, name: str, user_mask: np.ndarray | None = None) -> ExemplarMask:
        image = self._check_image(image, name)
        h, w = image.shape[:2]
        if self.mode == "ellipse":
            return ExemplarMask(ellipse_mask(h, w), "ellipse", None)
        if self.mode in ("auto", "user") and user_mask is not None:
            return ExemplarMask(self._user(user_mask, h, w, name), "user", None)
        if self.mode == "user":
            raise ValueError(
                f"exemplar {name!r}: mask mode 'user' needs a user mask for every exemplar and none was given; "
                "add its mask to the pool or use mask mode 'auto' (face detector)"
            )
        box = self.detect(image, name)
        if box is None:
            side = math.ceil(self.min_face * min(h, w))
            raise FaceNotFound(
                name,
                f"the frontal-face detector found no face of side >= {side} px in the {w}x{h} photo; "
                "the exemplar is skipped (give it a user mask, or use mask mode 'ellipse' for aligned crops)",
            )
        return ExemplarMask(ellipse_mask(h, w, box, self.expand), "detector", box)

    # ------------------------------------------------------------------ detector

    def detect(self, image: np.ndarray, name: str = "<image>") -> tuple[int, int, int, int] | None:
        """The largest frontal face box (x, y, w, h) with side >= min_face of the shorter side, or None."""
        import cv2

        image = self._check_image(image, name)
        h, w = image.shape[:2]
        side = max(1, math.ceil(self.min_face * min(h, w)))
        gray = cv2.equalizeHist(cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY))
        faces = self._load_cascade().detectMultiScale(
            gray, scaleFactor=SCALE_FACTOR, minNeighbors=MIN_NEIGHBORS, minSize=(side, side)
        )
        boxes = [tuple(int(v) for v in f) for f in np.asarray(faces).reshape(-1, 4)]
        boxes = [b for b in boxes if b[2] >= side and b[3] >= side]
        if not boxes:
            return None
        # largest first; ties broken by position so the pick never depends on detection order
        return min(boxes, key=lambda b: (-b[2] * b[3], b[1], b[0]))

    def _load_cascade(self):
        if self._cascade is None:
            import cv2

            path = cv2.data.haarcascades + CASCADE_FILE
            cascade = cv2.CascadeClassifier(path)
            if cascade.empty():
                raise RuntimeError(
                    f"could not load OpenCV's face cascade {path}; install opencv-python-headless>=4.8,<5 "
                    "(its wheel ships the cascade files)"
                )
            self._cascade = cascade
        return self._cascade

    # ------------------------------------------------------------------ validation, user masks

    @staticmethod
    def _check_image(image: np.ndarray, name: str) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
            raise ValueError(
                f"exemplar {name!r}: image must be a uint8 (H, W, 3) RGB array, got {image.dtype} {image.shape}"
            )
        return image

    @staticmethod
    def _user(user_mask: np.ndarray, h: int, w: int, name: str) -> np.ndarray:
        m = np.asarray(user_mask)
        if m.ndim == 3 and m.shape[2] == 1:
            m = m[:, :, 0]
        if m.ndim != 2 or m.size == 0:
            raise ValueError(f"user mask for exemplar {name!r} must be an H x W array, got shape {m.shape}")
        if m.dtype == bool:
            binary = m
        else:
            if not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
                raise ValueError(f"user mask for exemplar {name!r} must be bool, integer or float, got {m.dtype}")
            v = m.astype(np.float64)
            if not np.all(np.isfinite(v)) or v.min() < 0 or v.max() > 255:
                raise ValueError(
                    f"user mask for exemplar {name!r} must hold values in [0, 1] or [0, 255], "
                    f"got range [{np.nanmin(v)}, {np.nanmax(v)}] (NaN/inf: {not np.all(np.isfinite(v))})"
                )
            scale = 1.0 if v.max() <= 1.0 else 255.0  # 0/1 and probability masks, else 8-bit masks
            binary = v >= 0.5 * scale
        if binary.shape != (h, w):
            img = Image.fromarray(binary.astype(np.uint8) * 255, mode="L").resize((w, h), Image.NEAREST)
            binary = np.asarray(img) >= 128
        if not binary.any() or binary.all():
            what = "all zero (no region to generate)" if not binary.any() else "all one (nothing of the photo kept)"
            raise ValueError(
                f"user mask for exemplar {name!r} is {what} after binarising at half its scale and resizing to "
                f"{w}x{h}; fix the mask so that 1 (or 255) marks the face to generate and 0 the rest, "
                "or leave it out to use the face detector"
            )
        return binary.astype(np.float32)
