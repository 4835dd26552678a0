"""Identity encoder (ArcFace-style embedding) in ONNX: C_ID for MAUGen, identity similarity in eval, and a
build's identity-leakage measure (the highest similarity to a generator's training subjects)."""

from __future__ import annotations

import numpy as np

from .runtime import OnnxModel


class OnnxIdentityEncoder(OnnxModel):
    task = "identity"

    @property
    def dim(self) -> int | None:
        return self.output_widths[0]

    @property
    def verify_threshold(self) -> float | None:
        return self.spec.threshold

    def embed(self, images: np.ndarray) -> np.ndarray:
        """(B, D) float32 embeddings, L2-normalised (cosine similarity = dot product)."""
        (out,) = self.run(images)
        norm = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norm, 1e-12)).astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (B, D) embedding batches."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=1)


def max_similarity(embeddings: np.ndarray, references: np.ndarray) -> np.ndarray:
    """float32 (B,): each row's highest cosine similarity to any row of `references` (both L2-normalised,
    so a dot product); the identity-leakage measure against a generator's training subjects."""
    if len(embeddings) == 0:
        return np.zeros(0, np.float32)
    return (np.asarray(embeddings, np.float32) @ np.asarray(references, np.float32).T).max(axis=1)
