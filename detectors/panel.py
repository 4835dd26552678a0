"""`DetectorPanel`: the N AU detectors, their consensus and the realism discriminator, used together.

This is what a detector actor owns: it loads every model once and turns a batch of images into
one `Detection` (every detector's raw output, the consensus with its agreement mask, realism, and,
when given the generator's training subjects' embeddings, each face's highest identity similarity
to them: the leakage measure of factory/leakage.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.facs import DEFAULT_OCCURRENCE_THRESHOLD

from .au import AUOutput, OnnxAUDetector
from .builtin import resolve
from .consensus import Consensus, consensus
from .identity import OnnxIdentityEncoder, max_similarity
from .realism import OnnxRealism
from .runtime import log_providers
from .spec import SpecError

log = logging.getLogger(__name__)


@dataclass
class Detection:
    outputs: list[AUOutput]  # one per AU detector, in config order
    consensus: Consensus
    realism: np.ndarray | None  # float32 (B,) in [0, 1], None without a realism model
    #: float32 (B,): highest cosine similarity to a training subject; None when not measured
    training_similarity: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.consensus)

    def raw(self, j: int) -> dict[str, dict[str, list[float | None]]]:
        """Sample j's raw detector outputs, JSON-ready (None where a detector has no opinion)."""
        out = {}
        for o in self.outputs:
            out[o.name] = {
                "probability": _nan_to_none(o.probability[j]),
                "intensity": _nan_to_none(o.intensity[j]),
            }
        return out


def _nan_to_none(row: np.ndarray) -> list[float | None]:
    return [None if np.isnan(x) else round(float(x), 4) for x in row]


class DetectorPanel:
    """AU detectors + k-of-N consensus + realism, configured by spec references."""

    def __init__(
        self,
        au_detectors: list[str],
        min_agree: int,
        realism: str | None = None,
        threads: int = 0,
        occurrence_threshold: int = DEFAULT_OCCURRENCE_THRESHOLD,
        batch_size: int = 64,
        identity_encoder: str | None = None,
        training_subjects: np.ndarray | None = None,
    ):
        """`training_subjects` (float32 (N, D), L2-normalised, embedded by `identity_encoder`'s model) turns
        on the training-similarity measure; both or neither."""
        if min_agree > len(au_detectors):
            raise SpecError(f"min_agree={min_agree} exceeds the {len(au_detectors)} configured AU detectors")
        self.detectors = [
            OnnxAUDetector(
                str(resolve(r)), threads=threads, occurrence_threshold=occurrence_threshold, batch_size=batch_size
            )
            for r in au_detectors
        ]
        names = [d.name for d in self.detectors]
        if len(set(names)) != len(names):
            raise SpecError(f"two AU detectors share a name ({names}); give each spec its own `name:`")
        self.k = min_agree
        self.realism = OnnxRealism(str(resolve(realism)), threads=threads, batch_size=batch_size) if realism else None
        self.identity: OnnxIdentityEncoder | None = None
        self.subjects: np.ndarray | None = None
        if training_subjects is not None:
            if identity_encoder is None:
                raise ValueError("training_subjects need the identity_encoder that embedded them")
            self.identity = OnnxIdentityEncoder(str(resolve(identity_encoder)), threads=threads, batch_size=batch_size)
            self.subjects = np.asarray(training_subjects, np.float32)
            if self.subjects.ndim != 2 or self.identity.dim not in (None, self.subjects.shape[1]):
                raise SpecError(
                    f"training subjects of shape {self.subjects.shape} do not fit identity encoder "
                    f"{self.identity.loaded.path} ({self.identity.dim}-d embeddings); recompute them with that encoder"
                )
        cov = np.sum([d.covers for d in self.detectors], axis=0)
        never = [i for i, c in enumerate(cov) if c < min_agree]
        if never:
            from core.facs import AUS

            log.warning(
                "AUs %s are covered by fewer than min_agree=%d detectors: never agreed, never checked",
                [AUS[i] for i in never],
                min_agree,
            )
        for m in [*self.detectors, *(x for x in (self.realism, self.identity) if x is not None)]:
            log_providers(m)

    def detect(self, images: np.ndarray) -> Detection:
        outputs = [d.predict(images) for d in self.detectors]
        real = self.realism.score(images) if self.realism else None
        sim = None
        if self.identity is not None and self.subjects is not None:
            sim = max_similarity(self.identity.embed(images), self.subjects)
        return Detection(outputs=outputs, consensus=consensus(outputs, self.k), realism=real, training_similarity=sim)

    def describe(self) -> dict[str, Any]:
        return {
            "au_detectors": [d.describe() for d in self.detectors],
            "min_agree": self.k,
            "realism": self.realism.describe() if self.realism else None,
            "identity_encoder": self.identity.describe() if self.identity else None,
            "training_subjects": None if self.subjects is None else len(self.subjects),
        }


def model_hashes(refs: list[str]) -> dict[str, str]:
    """sha256 of each referenced model file, without starting ONNX Runtime (for build.json)."""
    from .spec import file_sha256, load_spec

    out = {}
    for r in refs:
        loaded = load_spec(resolve(r))
        if not loaded.model_path.is_file():
            raise SpecError(f"ONNX model {loaded.model_path} (from spec {loaded.path}) does not exist")
        out[r] = file_sha256(loaded.model_path)
    return out
