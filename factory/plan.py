"""The plan: which shards a build has, how big each is, and the quota of every stratum in it.

A stratum (a "cell") is one (emotion, skin-tone group, age group). Corpus position p gets the
cell that a golden-ratio low-discrepancy sequence picks from the cumulative cell weights, so
every contiguous run of positions (one shard, or the whole corpus) holds each cell in proportion
to its weight up to a small discrepancy; a shard's quotas are the cells of its positions. Planning
is O(1) per shard in memory and never needs the whole corpus at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from core.facs import EMOTION_NAMES
from pipelines.puppet.identity import AGE_GROUPS, SKIN_TONE_GROUPS

from .config import FactoryConfig

_PHI = (np.sqrt(5.0) - 1.0) / 2.0  # fractional golden ratio: the 1-d low-discrepancy stride


@dataclass(frozen=True)
class Cell:
    emotion: str
    skin_group: int
    age_group: str


@dataclass(frozen=True)
class CellGrid:
    """The strata a plan balances over, enumerated once (index = (e * S + s) * A + a)."""

    emotions: tuple[str, ...] = EMOTION_NAMES
    skin_groups: int = SKIN_TONE_GROUPS
    age_groups: tuple[str, ...] = AGE_GROUPS

    @property
    def size(self) -> int:
        return len(self.emotions) * self.skin_groups * len(self.age_groups)

    def cell(self, index: int) -> Cell:
        rest, a = divmod(int(index), len(self.age_groups))
        e, s = divmod(rest, self.skin_groups)
        return Cell(self.emotions[e], s, self.age_groups[a])

    def emotion_of(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(indices) // (self.skin_groups * len(self.age_groups))

    def skin_of(self, indices: np.ndarray) -> np.ndarray:
        return (np.asarray(indices) // len(self.age_groups)) % self.skin_groups

    def age_of(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(indices) % len(self.age_groups)


GRID = CellGrid()


@dataclass(frozen=True)
class ShardSpec:
    """One shard of the plan: its name, size, seed and per-cell quotas."""

    index: int
    name: str
    size: int
    seed: int
    quotas: np.ndarray  # int64 (GRID.size,), sums to size


def derive_seed(parent: int, index: int) -> int:
    """The seed of child `index` of `parent` (build -> shard, shard -> candidate): a 63-bit int, so the
    corpus bytes follow from build.seed alone. Changing this changes every build."""
    return int(np.random.SeedSequence([parent, index]).generate_state(1, np.uint64)[0] >> 1)


class Plan:
    """Shards of a build, computed on demand from the config (no per-sample state)."""

    def __init__(self, cfg: FactoryConfig):
        self.cfg = cfg
        self.target = cfg.build.target
        self.shard_size = cfg.build.shard_size
        self.num_shards = -(-self.target // self.shard_size)

    @cached_property
    def cell_weights(self) -> np.ndarray:
        p = self.cfg.plan
        we = np.array([p.emotions.get(e, 0.0) for e in GRID.emotions], dtype=np.float64)
        ws = np.array(p.skin_groups, dtype=np.float64)
        wa = np.array([p.age_groups.get(a, 0.0) for a in GRID.age_groups], dtype=np.float64)
        w = (we[:, None, None] * ws[None, :, None] * wa[None, None, :]).reshape(-1)
        return w / w.sum()

    @cached_property
    def _cumulative(self) -> np.ndarray:
        c = np.cumsum(self.cell_weights)
        c[-1] = 1.0
        return c

    @cached_property
    def _offset(self) -> float:
        return float(np.random.default_rng([self.cfg.build.seed, 0x9E3779B9]).random())

    def shard_name(self, index: int) -> str:
        return f"{self.cfg.build.shard_prefix}-{index:06d}"

    def shard_bounds(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard {index} outside the plan's {self.num_shards} shards")
        start = index * self.shard_size
        return start, min(start + self.shard_size, self.target)

    def cells_of_positions(self, start: int, stop: int) -> np.ndarray:
        """Cell index of corpus positions [start, stop)."""
        pos = np.arange(start, stop, dtype=np.float64)
        u = np.mod(pos * _PHI + self._offset, 1.0)
        cells = np.searchsorted(self._cumulative, u, side="right")
        return np.minimum(cells, GRID.size - 1)

    def shard_seed(self, index: int) -> int:
        return derive_seed(self.cfg.build.seed, index)

    def shard(self, index: int) -> ShardSpec:
        start, stop = self.shard_bounds(index)
        quotas = np.bincount(self.cells_of_positions(start, stop), minlength=GRID.size).astype(np.int64)
        return ShardSpec(index, self.shard_name(index), stop - start, self.shard_seed(index), quotas)

    def shards(self) -> Iterator[ShardSpec]:
        for i in range(self.num_shards):
            yield self.shard(i)

    def totals(self, chunk: int = 1_000_000) -> np.ndarray:
        """Planned count per cell over the whole corpus, in bounded-memory chunks."""
        total = np.zeros(GRID.size, dtype=np.int64)
        for start in range(0, self.target, chunk):
            stop = min(start + chunk, self.target)
            total += np.bincount(self.cells_of_positions(start, stop), minlength=GRID.size)
        return total

    def summary(self) -> dict:
        """What `--dry-run` prints: shards and the planned balance by emotion, skin and age."""
        totals = self.totals()
        idx = np.arange(GRID.size)
        by = lambda keyf, names: {  # noqa: E731
            str(n): int(totals[keyf(idx) == i].sum()) for i, n in enumerate(names)
        }
        sizes = {self.shard_size: self.num_shards - (1 if self.target % self.shard_size else 0)}
        if self.target % self.shard_size:
            sizes[self.target % self.shard_size] = 1
        return {
            "target": self.target,
            "shard_size": self.shard_size,
            "num_shards": self.num_shards,
            "shard_sizes": {str(k): v for k, v in sizes.items() if v},
            # a shard starts no round once it has drawn ceil(max_oversample * size); the last may pass it
            "max_candidates": sum(
                n * (int(np.ceil(self.cfg.build.max_oversample * size)) + self.cfg.plan.candidate_batch - 1)
                for size, n in sizes.items()
            ),
            "emotions": by(GRID.emotion_of, GRID.emotions),
            "skin_groups": by(GRID.skin_of, range(GRID.skin_groups)),
            "age_groups": by(GRID.age_of, GRID.age_groups),
        }
