"""Per-shard candidate stream: who to draw next so the shard fills its quotas exactly.

Candidate i of shard s is a pure function of (shard seed, i, its cell), so a re-run of the shard
draws the same candidates. Which cell candidate i gets depends on what was accepted before it,
which is itself deterministic, so the whole stream replays exactly. Cells that the filters reject
more often get more candidates (the acceptance estimate divides the remaining need).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from core.facs import AUS, EMOTIONS, NUM_AUS, STRENGTHS, au_index

from .config import FactoryConfig
from .identities import Identity, identity_source
from .plan import GRID, ShardSpec, derive_seed

log = logging.getLogger(__name__)

_I25, _I26, _I12 = au_index(25), au_index(26), au_index(12)


class QuotaExhaustedError(RuntimeError):
    """A shard drew its max_oversample budget of candidates without filling its quotas."""


@dataclass(frozen=True)
class CandidateSpec:
    """One planned sample before expansion and generation: who, which emotion, which target AUs (factory/candidate.py carries the rest)."""

    key: str
    shard: int
    index: int
    seed: int
    cell: int
    emotion: str
    strength: int
    intensity: np.ndarray  # int8 (12,), target v_pre in AUS order
    identity: Identity  # a procedural person, or an entry of the identity pool (factory/identities.py)


def sample_target(rng: np.random.Generator, emotion: str, strength: int, extra_au_rate: float) -> np.ndarray:
    """A target AU intensity vector for an emotion prototype at a strength.

    Core AUs of the prototype get an intensity from the strength's range, optional ones join half
    of the time, other AUs join at `extra_au_rate` (mostly weak), and a few AUs get a trace (1),
    which stays below the occurrence threshold. Jaw drop brings lips part with it (anatomy).
    """
    proto = EMOTIONS[emotion]
    lo, hi = STRENGTHS[strength][1]
    v = np.zeros(NUM_AUS, dtype=np.int8)
    for au in proto.core:
        v[au_index(au)] = rng.integers(lo, hi + 1)
    for au in proto.optional:
        if rng.random() < 0.5:
            v[au_index(au)] = rng.integers(2, max(2, hi - 1) + 1)
    for i, au in enumerate(AUS):
        if v[i] == 0:
            u = rng.random()
            if u < extra_au_rate:
                v[i] = rng.integers(2, 4)
            elif u < extra_au_rate + 0.05:
                v[i] = 1
    if emotion == "contempt":
        v[_I12] = 2  # unilateral AU12+14 approximated by a weak AU12 (docs/facs.md)
    if v[_I26] >= 2 and v[_I25] < 2:
        v[_I25] = max(2, int(v[_I26]) - 1)
    return v


class ShardSampler:
    """Draws candidates for one shard in rounds and keeps its quota accounting."""

    def __init__(self, spec: ShardSpec, cfg: FactoryConfig, image_size: int | None = None):
        self.spec = spec
        self.cfg = cfg
        self.identities = identity_source(cfg)
        self.image_size = image_size or cfg.build.image_size or cfg.puppet.image_size
        #: Pool exemplars passed over while drawing (unreadable, or no face found), with why.
        self.skipped_exemplars: list[str] = []
        self.batch = cfg.plan.candidate_batch
        self.max_candidates = int(np.ceil(cfg.build.max_oversample * spec.size))
        self.accepted = np.zeros(GRID.size, dtype=np.int64)
        self.tried = np.zeros(GRID.size, dtype=np.int64)
        self.passed = np.zeros(GRID.size, dtype=np.int64)  # passed every check (quota aside)
        self.drawn = 0
        strengths = sorted(cfg.plan.strengths)
        w = np.array([cfg.plan.strengths[s] for s in strengths], dtype=np.float64)
        self._strengths = np.array(strengths)
        self._strength_p = w / w.sum()

    @property
    def remaining(self) -> np.ndarray:
        return np.maximum(self.spec.quotas - self.accepted, 0)

    @property
    def done(self) -> bool:
        return int(self.accepted.sum()) >= self.spec.size

    def acceptance_estimate(self) -> np.ndarray:
        """Per-cell acceptance, pooled over the emotion and the demographic stratum (few samples per cell)."""
        overall = (self.passed.sum() + 1.0) / (self.tried.sum() + 1.0)
        e = GRID.emotion_of(np.arange(GRID.size))
        d = np.arange(GRID.size) % (GRID.skin_groups * len(GRID.age_groups))

        def pooled(groups: np.ndarray) -> np.ndarray:
            acc = np.bincount(groups, weights=self.passed)
            tr = np.bincount(groups, weights=self.tried)
            return ((acc + 2.0 * overall) / (tr + 2.0))[groups]

        est = pooled(e) * pooled(d) / overall
        return np.clip(est, 0.02, 1.0)

    def allocate(self) -> np.ndarray:
        """Candidate cells for the next round, or an empty array when the shard is full."""
        need = self.remaining / self.acceptance_estimate()
        total_need = need.sum()
        if total_need <= 0:
            return np.zeros(0, dtype=np.int64)
        if self.drawn >= self.max_candidates:
            raise QuotaExhaustedError(self._exhausted_message())
        # The round is never cut to the budget: a shard that fills its quotas draws the same
        # candidates whatever max_oversample is, so raising it on resume leaves committed bytes alone.
        n = int(min(self.batch, np.ceil(total_need)))
        share = need / total_need * n
        counts = np.floor(share).astype(np.int64)
        short = n - counts.sum()
        if short > 0:
            order = np.argsort(-(share - counts), kind="stable")
            counts[order[:short]] += 1
        return np.repeat(np.arange(GRID.size), counts)

    def draw(self) -> list[CandidateSpec]:
        cells = self.allocate()
        out = []
        for cell in cells:
            out.append(self._candidate(self.drawn, int(cell)))
            self.drawn += 1
        return out

    def _candidate(self, index: int, cell: int) -> CandidateSpec:
        seed = derive_seed(self.spec.seed, index)
        rng = np.random.default_rng(seed)
        c = GRID.cell(cell)
        strength = 0 if c.emotion == "neutral" else int(rng.choice(self._strengths, p=self._strength_p))
        if c.emotion == "neutral":
            intensity = np.where(rng.random(NUM_AUS) < 0.1, 1, 0).astype(np.int8)
        else:
            intensity = sample_target(rng, c.emotion, strength, self.cfg.plan.extra_au_rate)
        identity = self.identities.pick(rng, c.skin_group, c.age_group, self.image_size, self.skipped_exemplars)
        key = f"{self.spec.name}-{index:07d}"
        return CandidateSpec(key, self.spec.index, index, seed, cell, c.emotion, strength, intensity, identity)

    def record(self, candidates: list[CandidateSpec], passed: np.ndarray) -> np.ndarray:
        """Account one round; returns which candidates are kept (passed and within quota)."""
        keep = np.zeros(len(candidates), dtype=bool)
        for i, (cand, ok) in enumerate(zip(candidates, passed)):
            self.tried[cand.cell] += 1
            if not ok:
                continue
            self.passed[cand.cell] += 1
            if self.accepted[cand.cell] < self.spec.quotas[cand.cell]:
                self.accepted[cand.cell] += 1
                keep[i] = True
        return keep

    def _exhausted_message(self) -> str:
        rem = self.remaining
        worst = np.argsort(-rem, kind="stable")[:3]
        cells = ", ".join(
            f"{GRID.cell(c).emotion}/skin{GRID.cell(c).skin_group}/{GRID.cell(c).age_group} needs {rem[c]}"
            for c in worst
            if rem[c] > 0
        )
        return (
            f"shard {self.spec.name} accepted {int(self.accepted.sum())}/{self.spec.size} after "
            f"{self.drawn} candidates (build.max_oversample={self.cfg.build.max_oversample}); unfilled: {cells}. "
            "Raise build.max_oversample (a resume may: `factory resume OUT --set build.max_oversample=N` keeps "
            "the committed shards) or loosen the checks that reject these strata (a new build)."
        )
