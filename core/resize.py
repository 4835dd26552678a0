"""Resize the shorter side, then centre-crop: the pre-processing an ONNX spec's `input:` declares
(detectors/runtime.py), and what MAUGen's identity encoder is fed (pipelines/maugen/core.py). One
function, so the ONNX and the torch path of an identity spec see the same pixels; bilinear with
antialiasing and differentiable, for the identity loss. Imports torch only (no diffusers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_crop(x: torch.Tensor, size: int, resize: int | None = None) -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, size, size): the shorter side scaled to `resize` (default `size`),
    bilinear with antialiasing, then the centre `size` x `size` crop."""
    target = resize or size
    h, w = x.shape[-2:]
    if min(h, w) != target:
        s = target / min(h, w)
        x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", antialias=True, align_corners=False)
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    top, left = (h - size) // 2, (w - size) // 2
    return x[:, :, top : top + size, left : left + size]
