"""Per-sample figures of a report: label histograms, AU co-occurrence, emotion x demographic balance.

The stats markers only hold per-shard sums, so these figures read the committed shards' parquets,
six columns of them (column projection), one file per task on a small thread pool, and reduce each
file to a few small arrays with numpy at once. Memory stays flat however many rows the build has;
a million rows is a few seconds.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from core.facs import AUS, INTENSITY_MAX

from .layout import Layout
from .plan import GRID

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

#: The parquet columns the figures need; nothing else is read.
COLUMNS = ("emotion", "skin_group", "age_group", "target_intensity", "intensity", "occurrence")
N_AU = len(AUS)
N_BINS = INTENSITY_MAX + 1  # intensity 0..5, labels rounded to the nearest level


class ReportError(Exception):
    """A build file the report cannot read; the message names the file and what to do."""


@dataclass
class SampleAggregates:
    """Sums over accepted samples; two of them add up, so files are reduced independently."""

    rows: int = 0
    occ: np.ndarray = field(default_factory=lambda: np.zeros(N_AU, np.int64))
    target_occ: np.ndarray = field(default_factory=lambda: np.zeros(N_AU, np.int64))
    int_hist: np.ndarray = field(default_factory=lambda: np.zeros((N_AU, N_BINS), np.int64))
    target_int_hist: np.ndarray = field(default_factory=lambda: np.zeros((N_AU, N_BINS), np.int64))
    cooc: np.ndarray = field(default_factory=lambda: np.zeros((N_AU, N_AU), np.int64))
    emotion_skin: np.ndarray = field(default_factory=lambda: np.zeros((len(GRID.emotions), GRID.skin_groups), np.int64))
    emotion_age: np.ndarray = field(
        default_factory=lambda: np.zeros((len(GRID.emotions), len(GRID.age_groups)), np.int64)
    )

    def __iadd__(self, other: SampleAggregates) -> Self:
        self.rows += other.rows
        for name in ("occ", "target_occ", "int_hist", "target_int_hist", "cooc", "emotion_skin", "emotion_age"):
            getattr(self, name).__iadd__(getattr(other, name))
        return self


def _matrix(col: pa.ChunkedArray | pa.Array, dtype: Any) -> np.ndarray:
    """A fixed-size list<12> column as an (n, 12) numpy array without a Python loop."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=dtype).reshape(-1, N_AU)


def _codes(col: pa.ChunkedArray, names: tuple[str, ...]) -> np.ndarray:
    """Index of each string in `names` (-1 when unknown), vectorised by Arrow."""
    idx = pc.index_in(col, value_set=pa.array(list(names)))
    return pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _crosstab(a: np.ndarray, b: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    ok = (a >= 0) & (b >= 0) & (a < shape[0]) & (b < shape[1])
    return np.bincount(a[ok] * shape[1] + b[ok], minlength=shape[0] * shape[1]).reshape(shape)


def aggregate_table(table: pa.Table, threshold: int) -> SampleAggregates:
    """Reduce the rows of one parquet to a SampleAggregates (pure numpy, no per-row Python)."""
    agg = SampleAggregates(rows=table.num_rows)
    if not table.num_rows:
        return agg
    target = _matrix(table["target_intensity"], np.int64)
    inten = _matrix(table["intensity"], np.float32)
    occ = _matrix(table["occurrence"], bool)
    levels = np.clip(np.rint(np.nan_to_num(inten)), 0, INTENSITY_MAX).astype(np.int64)
    au = np.arange(N_AU)[None, :]
    agg.occ = occ.sum(0, dtype=np.int64)
    agg.target_occ = (target >= threshold).sum(0, dtype=np.int64)
    agg.int_hist = np.bincount((au * N_BINS + levels).ravel(), minlength=N_AU * N_BINS).reshape(N_AU, N_BINS)
    tl = np.clip(target, 0, INTENSITY_MAX)
    agg.target_int_hist = np.bincount((au * N_BINS + tl).ravel(), minlength=N_AU * N_BINS).reshape(N_AU, N_BINS)
    o = occ.astype(np.float32)
    agg.cooc = np.rint(o.T @ o).astype(np.int64)  # exact: float32 counts up to 2**24 rows per file
    emo = _codes(table["emotion"], GRID.emotions)
    age = _codes(table["age_group"], GRID.age_groups)
    skin = table["skin_group"].to_numpy().astype(np.int64)
    agg.emotion_skin = _crosstab(emo, skin, agg.emotion_skin.shape)
    agg.emotion_age = _crosstab(emo, age, agg.emotion_age.shape)
    return agg


def arrow_filesystem(layout: Layout) -> pafs.FileSystem:
    """Arrow's own local filesystem where OUT is local (fastest), else fsspec's (s3://, ...) wrapped."""
    if layout.is_local:
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(layout.fs))


def read_parquet(layout: Layout, name: str, fs: pafs.FileSystem | None = None) -> pa.Table:
    """The needed columns of one shard's parquet, or a ReportError naming the file and the fix."""
    path = layout.parquet(name)
    try:
        return pq.read_table(path, columns=list(COLUMNS), filesystem=fs or arrow_filesystem(layout), use_threads=False)
    except FileNotFoundError:
        raise ReportError(
            f"{path} is missing although shard {name} is committed; run `factory verify {layout.out}`, "
            f"then delete {layout.stats(name)} and `factory resume {layout.out}` to redo the shard"
        ) from None
    except (pa.ArrowException, OSError, ValueError) as err:
        raise ReportError(
            f"{path} is not a readable parquet of this factory ({err}); run `factory verify {layout.out}`, "
            f"then delete {layout.stats(name)} and `factory resume {layout.out}` to redo the shard"
        ) from None


def aggregate_shards(layout: Layout, names: list[str], threshold: int, threads: int = 4) -> SampleAggregates:
    """Sum the per-file aggregates of the given committed shards."""
    fs = arrow_filesystem(layout)
    total = SampleAggregates()
    if not names:
        return total

    def one(name: str) -> SampleAggregates:
        return aggregate_table(read_parquet(layout, name, fs), threshold)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for agg in pool.map(one, names):
            total += agg
    log.debug("aggregated %d rows from %d parquets", total.rows, len(names))
    return total


def planned_crosstabs(cell_totals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The plan's emotion x skin and emotion x age counts over the whole corpus, from its per-cell totals."""
    cells = np.arange(GRID.size)
    emo, skin, age = GRID.emotion_of(cells), GRID.skin_of(cells), GRID.age_of(cells)
    es = np.zeros((len(GRID.emotions), GRID.skin_groups), np.int64)
    ea = np.zeros((len(GRID.emotions), len(GRID.age_groups)), np.int64)
    np.add.at(es, (emo, skin), cell_totals)
    np.add.at(ea, (emo, age), cell_totals)
    return es, ea


def identities_summary(cfg: Any, stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the identities came from; for a pool: mask sources, skipped exemplars and the plan axes
    its attributes could not balance (their accepted counts then say `unknown`)."""
    ic = cfg.identities
    out: dict[str, Any] = {"source": ic.source, "pool": ic.pool}
    if ic.source == "puppet":
        return out
    masks: dict[str, int] = defaultdict(int)
    skipped: dict[str, dict[str, Any]] = {}
    axes: set[str] = set()
    for s in stats:
        ident = s.get("identities", {})
        axes.update(ident.get("unbalanced_axes", []))
        for k, n in ident.get("mask_sources", {}).items():
            masks[k] += int(n)
        for name, v in ident.get("skipped_exemplars", {}).items():
            skipped.setdefault(name, {"why": v["why"], "times": 0})["times"] += int(v["times"])
    return out | {"unbalanced_axes": sorted(axes), "mask_sources": dict(masks), "skipped_exemplars": skipped}


def storage_summary(cfg: Any, stats: list[dict[str, Any]], n_accepted: int) -> dict[str, Any]:
    """Bytes on disk per accepted sample (tar + parquet), in the build's image format: what sizes a
    million-sample corpus."""
    total = sum(int(f.get("bytes", 0)) for s in stats for k, f in s.get("files", {}).items() if k in ("tar", "parquet"))
    return {
        "image_format": cfg.build.image_format,
        "jpg_quality": cfg.build.jpg_quality if cfg.build.image_format == "jpg" else None,
        "bytes": total,
        "bytes_per_sample": total / n_accepted if n_accepted else None,
        # requests to an object store retried after a transient error (503 SlowDown, 500, a reset)
        "store_retries": sum(int(s.get("store_retries", 0)) for s in stats),
    }
