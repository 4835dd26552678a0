"""Folders of face images: the identity bank (exemplars to condition MAUGen on) and the one image loader.

Every on-disk source (DISFA and BP4D frames, identity-bank photos) goes through `load_face`, so a
frame and an exemplar of one person are cropped and resized the same way, and an unreadable file
fails with its path instead of a bare PIL traceback from inside a DataLoader worker.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

#: File types the identity bank reads (lower-case suffixes).
BANK_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")


def load_face(path: str | Path, size: int) -> np.ndarray:
    """uint8 (size, size, 3) RGB: the image centre-cropped to a square, then resized.

    A plain centre crop (no face detector): the sources we read (DISFA, BP4D, bank photos) have
    the face in the middle of the frame. JPEGs are decoded at a reduced scale where that still
    leaves at least 2x `size` pixels, which makes loading full-resolution video frames cheap.
    """
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.draft("RGB", (2 * size, 2 * size))  # no-op for formats other than JPEG
            img = img.convert("RGB")
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
            if side != size:
                img = img.resize((size, size), Image.LANCZOS)
            return np.asarray(img, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}; replace or remove the file") from e


class IdentityBank:
    """All face images of a folder (sorted by file name), loaded once, centre-cropped and resized.

    Loaded eagerly so that a bad file fails when the bank is built, not in the middle of a run.
    """

    def __init__(self, folder: str | Path, size: int = 64):
        self.folder = Path(folder)
        self.size = int(size)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"identity bank folder {self.folder} does not exist (or is not a folder)")
        files = sorted(p for p in self.folder.iterdir() if p.is_file() and p.suffix.lower() in BANK_SUFFIXES)
        if not files:
            raise ValueError(
                f"identity bank folder {self.folder} holds no images ({', '.join(BANK_SUFFIXES)}); "
                "put at least one face photo there"
            )
        self.names: list[str] = [p.name for p in files]
        self.paths: list[Path] = files
        self.images: np.ndarray = np.stack([load_face(p, self.size) for p in files])
        log.info("identity bank %s: %d images at %d px", self.folder, len(files), self.size)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[str, np.ndarray]:
        """(file name, uint8 (size, size, 3) image)."""
        return self.names[i], self.images[i]
