"""Realism discriminator: an ONNX model scoring how plausible an image is as a face, in [0, 1]."""

from __future__ import annotations

import numpy as np

from .runtime import OnnxModel, sigmoid


class OnnxRealism(OnnxModel):
    task = "realism"

    def expected_width(self, kind: str) -> int | None:
        return 1

    def _width_hint(self) -> str:
        return "; a realism model returns one score per image"

    @property
    def default_threshold(self) -> float:
        return 0.5 if self.spec.threshold is None else float(self.spec.threshold)

    def score(self, images: np.ndarray) -> np.ndarray:
        """(B,) float32 realism scores in [0, 1]; higher is more realistic."""
        (out,) = self.run(images)
        s = out[:, 0]
        s = sigmoid(s) if self.spec.outputs[0].kind == "logit" else np.clip(s, 0.0, 1.0)
        return s.astype(np.float32)
