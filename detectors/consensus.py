"""k-of-N consensus of AU detectors, per sample and per AU.

No public recipe exists; ours (docs/facs.md): for each AU, the detectors that cover it vote
present/absent. The consensus label is the majority vote, and the AU is *agreed* when at least
`k` of those detectors cast that vote (a tie is never agreed). Intensity is the median over the
covering detectors that output intensity. AUs that fewer than `k` detectors cover are never agreed,
so downstream checks and losses simply leave them out (the agreement mask says so per sample).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from core.facs import NUM_AUS

from .au import AUOutput


@dataclass
class Consensus:
    occurrence: np.ndarray  # bool (B, 12): majority vote of the covering detectors
    intensity: np.ndarray  # float32 (B, 12): median intensity of the covering intensity detectors (NaN: none)
    agree: np.ndarray  # bool (B, 12): at least k covering detectors cast the majority vote
    votes: np.ndarray  # int8 (B, 12): detectors voting "present"
    coverage: np.ndarray  # int8 (12,): detectors covering each AU
    k: int

    def __len__(self) -> int:
        return len(self.occurrence)


def consensus(outputs: list[AUOutput], k: int) -> Consensus:
    """Combine the detectors' views of one batch; see the module docstring for the rule."""
    if not outputs:
        raise ValueError("consensus needs at least one detector output")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    b = len(outputs[0])
    if any(len(o) != b for o in outputs):
        raise ValueError(f"detector outputs cover different batch sizes: {[len(o) for o in outputs]}")
    occ = np.stack([o.occurrence for o in outputs])  # (N, B, 12), NaN = not covered
    covered = ~np.isnan(occ)
    on = np.where(covered, occ, 0.0).sum(axis=0)
    n = covered.sum(axis=0)
    off = n - on
    decision = on > off
    agree = (np.maximum(on, off) >= k) & (on != off)
    inten = np.stack([o.intensity for o in outputs])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: AUs no intensity detector covers
        med = np.nanmedian(inten, axis=0).astype(np.float32) if b else np.zeros((0, NUM_AUS), np.float32)
    cov = np.sum([o.covers for o in outputs], axis=0)
    return Consensus(
        occurrence=decision,
        intensity=med,
        agree=agree,
        votes=on.astype(np.int8),
        coverage=np.asarray(cov, dtype=np.int8),
        k=k,
    )
