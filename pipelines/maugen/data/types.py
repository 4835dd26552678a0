"""The one sample type every MAUGen training dataset yields (puppet, DISFA, BP4D).

Why one type: the trainer, the losses and the detectors' consensus step read the same fields
whatever the source, and a dataset that cannot fill a field says so with NaN (labels) or ones
(mask) rather than a different shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from core.facs import NUM_AUS


@dataclass
class FaceSample:
    """One training sample of MAUGen."""

    image: np.ndarray  # uint8 (H, W, 3) RGB: the face to generate
    intensity: np.ndarray  # float32 (12,) in AUS order, 0-5; NaN where the dataset does not code the AU
    occurrence: np.ndarray  # float32 (12,) 0/1; NaN where not coded
    mask: np.ndarray  # float32 (H, W) in [0, 1]: the face region (inpainting and denoising-loss mask)
    exemplar: np.ndarray  # uint8 (H, W, 3): an image of the same identity (the identity condition)
    prompt: str  # text describing the AU target of `image`
    subject: str  # identity / subject id (splits are by subject)
    meta: dict = field(default_factory=dict)  # source-specific provenance (file, frame, task ...)
    #: float32 (H, W) >= 0, where the source knows the facial features exactly (puppet): each feature (brows,
    #: eyes, nose, mouth) scaled to a mean of 1 over the face, then averaged, so a small feature weighs as much
    #: as a large one; `losses.feature_weight` adds it to the denoising loss's weights
    features: np.ndarray | None = None

    def __post_init__(self) -> None:
        h, w = self.image.shape[:2]
        if self.image.dtype != np.uint8 or self.image.shape != (h, w, 3):
            raise ValueError(f"FaceSample.image must be uint8 (H, W, 3), got {self.image.dtype} {self.image.shape}")
        if self.exemplar.dtype != np.uint8 or self.exemplar.shape != (h, w, 3):
            raise ValueError(
                f"FaceSample.exemplar must be uint8 {(h, w, 3)} like the image, got {self.exemplar.dtype} {self.exemplar.shape}"
            )
        if self.mask.shape != (h, w):
            raise ValueError(f"FaceSample.mask must be (H, W) = {(h, w)}, got {self.mask.shape}")
        if self.features is not None and self.features.shape != (h, w):
            raise ValueError(f"FaceSample.features must be (H, W) = {(h, w)}, got {self.features.shape}")
        for name in ("intensity", "occurrence"):
            if getattr(self, name).shape != (NUM_AUS,):
                raise ValueError(f"FaceSample.{name} must have {NUM_AUS} entries, got {getattr(self, name).shape}")
