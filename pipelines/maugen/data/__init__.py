"""MAUGen training data: puppet, DISFA and BP4D datasets yielding `FaceSample`s, and their collate.

Every dataset yields the same `FaceSample` (types.py), so one `collate` batches any of them (or a
`torch.utils.data.ConcatDataset` of several) for the trainer.
"""

from __future__ import annotations

import numpy as np
import torch

from pipelines.identities.images import load_face
from pipelines.maugen.data.bp4d import BP4D_FOLDS, BP4D_SUBJECT, BP4D_SUBJECTS, BP4DDataset, bp4d_split
from pipelines.maugen.data.disfa import DISFA_FOLDS, DISFA_SUBJECTS, DisfaDataset, disfa_split, extract_frames
from pipelines.maugen.data.prompting import describe
from pipelines.maugen.data.puppet import PuppetFaceDataset, puppet_subjects
from pipelines.maugen.data.types import FaceSample

__all__ = [
    "BP4D_FOLDS",
    "BP4D_SUBJECT",
    "BP4D_SUBJECTS",
    "DISFA_FOLDS",
    "DISFA_SUBJECTS",
    "BP4DDataset",
    "DisfaDataset",
    "FaceSample",
    "PuppetFaceDataset",
    "bp4d_split",
    "collate",
    "describe",
    "disfa_split",
    "extract_frames",
    "load_face",
    "puppet_subjects",
]


def _images(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) arrays -> float (B, 3, H, W) in [-1, 1] (the diffusion models' range)."""
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def collate(samples: list[FaceSample]) -> dict[str, torch.Tensor | list]:
    """Batch `FaceSample`s for the trainer (use as a DataLoader's `collate_fn`).

    image, exemplar: float (B, 3, H, W) in [-1, 1]; mask: float (B, 1, H, W) in [0, 1];
    intensity, occurrence: float (B, 12) with NaN kept where an AU is not coded (losses mask it);
    prompt, subject, meta: lists; features: float (B, 1, H, W) when every sample has them, else None.
    """
    if not samples:
        raise ValueError("collate got an empty batch")
    shapes = {s.image.shape for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"collate: samples have different image sizes {sorted(shapes)}; build datasets with one size")
    return {
        "image": _images([s.image for s in samples]),
        "exemplar": _images([s.exemplar for s in samples]),
        "mask": torch.from_numpy(np.stack([s.mask for s in samples]).astype(np.float32)).unsqueeze(1),
        "intensity": torch.from_numpy(np.stack([s.intensity for s in samples]).astype(np.float32)),
        "occurrence": torch.from_numpy(np.stack([s.occurrence for s in samples]).astype(np.float32)),
        "prompt": [s.prompt for s in samples],
        "subject": [s.subject for s in samples],
        "meta": [s.meta for s in samples],
        "features": (
            torch.from_numpy(np.stack([s.features for s in samples]).astype(np.float32)).unsqueeze(1)
            if all(s.features is not None for s in samples)
            else None
        ),
    }
