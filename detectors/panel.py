"""`DetectorPanel`: the N AU detectors, their consensus and the realism discriminator, used together.

This is what a detector actor owns: it loads every model once and turns a batch of images into
one `Detection` (every detector's raw output, the consensus with its agreement mask, realism).
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
from .realism import OnnxRealism
from .runtime import log_providers
from .spec import SpecError

log = logging.getLogger(__name__)


@dataclass
class Detection:
    outputs: list[AUOutput]  # one per AU detector, in config order
    consensus: Consensus
    realism: np.ndarray | None  # float32 (B,) in [0, 1], None without a realism model

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
    ):
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
        cov = np.sum([d.covers for d in self.detectors], axis=0)
        never = [i for i, c in enumerate(cov) if c < min_agree]
        if never:
            from core.facs import AUS

            log.warning(
                "AUs %s are covered by fewer than min_agree=%d detectors: never agreed, never checked",
                [AUS[i] for i in never],
                min_agree,
            )
        for m in [*self.detectors, *([self.realism] if self.realism else [])]:
            log_providers(m)

    def detect(self, images: np.ndarray) -> Detection:
        outputs = [d.predict(images) for d in self.detectors]
        real = self.realism.score(images) if self.realism else None
        return Detection(outputs=outputs, consensus=consensus(outputs, self.k), realism=real)

    def describe(self) -> dict[str, Any]:
        return {
            "au_detectors": [d.describe() for d in self.detectors],
            "min_agree": self.k,
            "realism": self.realism.describe() if self.realism else None,
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
