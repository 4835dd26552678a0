"""The one image loader for faces: a centre square crop, resized (exemplars, DISFA/BP4D frames).

Every on-disk source goes through `decode_face`, so a training frame and a build's exemplar of
one person are cropped and resized the same way, and an unreadable file fails with its name
instead of a bare PIL traceback from inside a DataLoader worker or a shard.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


def _square(img: Image.Image, size: int, resample: int) -> Image.Image:
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img.resize((size, size), resample) if side != size else img


def _open(source: bytes | str | Path, size: int, name: str, mode: str, resample: int) -> np.ndarray:
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.draft(mode, (2 * size, 2 * size))  # JPEG: decode at a reduced scale; a no-op otherwise
            return np.asarray(_square(img.convert(mode), int(size), resample), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"image {name} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"cannot read image {name}: {e}; replace or remove the file") from e


def decode_face(source: bytes | str | Path, size: int, name: str | None = None) -> np.ndarray:
    """uint8 (size, size, 3) RGB: the image centre-cropped to a square, then resized.

    A plain centre crop (no face detector): the sources we read (DISFA, BP4D, pool photos) have the
    face in the middle of the frame; the inpainting mask finds the face inside it.
    """
    return _open(source, size, name or str(source)[:200], "RGB", Image.LANCZOS)


def decode_mask(source: bytes | str | Path, size: int, name: str | None = None) -> np.ndarray:
    """float32 (size, size) in {0, 1}: a user's mask image (white = the face to generate), cropped as
    its photo is, binarised at half of its largest value. An empty or full mask is an error naming it."""
    m = _open(source, size, name or str(source)[:200], "L", Image.NEAREST).astype(np.float32)
    top = float(m.max())
    out = (m >= max(top, 1.0) / 2).astype(np.float32)
    if not 0 < out.mean() < 1:
        raise ValueError(
            f"mask {name} is {'empty' if out.mean() == 0 else 'full'}; white must cover the face only "
            "(or remove the mask to let the face detector find it)"
        )
    return out


def load_face(path: str | Path, size: int) -> np.ndarray:
    """`decode_face` of a file path (the name in errors is the path)."""
    return decode_face(Path(path), size, str(path))
