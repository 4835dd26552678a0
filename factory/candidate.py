"""The candidate record: one planned sample and everything the stages learn about it, up to its fate.

The shard runner (factory/shard.py) fills it stage by stage - the prompt after expand, image and
labels after generate, the detector outputs after detect - the checks (factory/checks.py) read it
and set its fate, and the writer turns an accepted one into KEY.png, KEY.json, KEY.au.npy and a
parquet row. A bench or a user's script builds records around any images and runs the same checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .sampler import CandidateSpec

if TYPE_CHECKING:
    from detectors.panel import Detection
    from pipelines.prompts.types import Expansion

    from .identities import Exemplar

#: The fate of a candidate that passed every check and fits its shard's quotas.
ACCEPTED = "accepted"


@dataclass(frozen=True)
class SampleDetection:
    """One sample's row of a batch's detector outputs: consensus, agreement, realism, training similarity
    (and each detector's raw output)."""

    occurrence: np.ndarray  # bool (12,): the consensus
    intensity: np.ndarray  # float (12,): median intensity of the detectors with one (NaN: none)
    agree: np.ndarray  # bool (12,): AUs on which at least min_agree detectors cast the consensus vote
    votes: np.ndarray
    coverage: np.ndarray
    min_agree: int
    realism: float | None
    training_similarity: float | None  # highest identity similarity to a MAUGen training subject (None: not measured)
    batch: Detection
    row: int

    @classmethod
    def of(cls, det: Detection, row: int) -> SampleDetection:
        c = det.consensus
        realism = None if det.realism is None else float(det.realism[row])
        sim = None if det.training_similarity is None else float(det.training_similarity[row])
        return cls(
            c.occurrence[row], c.intensity[row], c.agree[row], c.votes[row], c.coverage, c.k, realism, sim, det, row
        )

    def raw(self) -> dict[str, dict[str, list[float | None]]]:
        return self.batch.raw(self.row)


@dataclass
class Candidate:
    """A candidate's way through the graph: its spec, prompt, image, labels, detector outputs, scores and fate.

    `exemplar` is what MAUGen is conditioned on (None for the puppet renderer, which needs none);
    `image`, `intensity` and `occurrence_prob` are the generator's output (None before generate, or
    when an earlier check rejected it); `valid` says they hold no NaN/inf and no blank image;
    `scores` holds each check's measured value, set by the check that measured it; `fate` is None
    while undecided, then ACCEPTED or the rejection reason.
    """

    spec: CandidateSpec
    expansion: Expansion | None = None
    exemplar: Exemplar | None = None
    image: np.ndarray | None = None
    intensity: np.ndarray | None = None
    occurrence_prob: np.ndarray | None = None
    valid: bool = False
    detection: SampleDetection | None = None
    scores: dict[str, float] = field(default_factory=dict)
    fate: str | None = None

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def generated(self) -> bool:
        return self.image is not None

    @property
    def occurrence(self) -> np.ndarray:
        """The generator's occurrence labels: its head's probability >= 0.5 (puppet: exact)."""
        if self.occurrence_prob is None:
            raise ValueError(f"candidate {self.key} has no labels yet (not generated)")
        return self.occurrence_prob >= 0.5

    def prompt_occurrence(self, threshold: int) -> np.ndarray:
        """The AUs the prompt describes at or above the occurrence threshold (what the parser read back)."""
        if self.expansion is None:
            raise ValueError(f"candidate {self.key} has no prompt yet (not expanded)")
        return np.asarray(self.expansion.parsed) >= threshold

    def describe(self) -> dict[str, Any]:
        """A short JSON-ready account (key, fate, scores) for logs and user scripts."""
        return {"key": self.key, "fate": self.fate, "scores": dict(self.scores)}
