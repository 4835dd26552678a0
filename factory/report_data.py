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
COLUMNS = ("emotion", "skin_group", "age_group", "target_intensity", "intensity", "occurrence", "training_similarity")
#: Columns newer than some builds: a parquet without them reads as all null there.
OPTIONAL_COLUMNS = frozenset({"training_similarity"})
N_AU = len(AUS)
N_BINS = INTENSITY_MAX + 1  # intensity 0..5, labels rounded to the nearest level
#: Training similarity (a cosine, -1..1) is summed as a histogram of this many bins: quantiles to 0.001.
SIM_BINS = 2000


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
    # training similarity over the rows that have one: histogram on [-1, 1], sum, max, count above a threshold
    sim_hist: np.ndarray = field(default_factory=lambda: np.zeros(SIM_BINS, np.int64))
    sim_sum: float = 0.0
    sim_max: float = -np.inf
    sim_above: int = 0

    def __iadd__(self, other: SampleAggregates) -> Self:
        self.rows += other.rows
        arrays = ("occ", "target_occ", "int_hist", "target_int_hist", "cooc", "emotion_skin", "emotion_age", "sim_hist")
        for name in arrays:
            getattr(self, name).__iadd__(getattr(other, name))
        self.sim_sum += other.sim_sum
        self.sim_max = max(self.sim_max, other.sim_max)
        self.sim_above += other.sim_above
        return self

    def similarity(self, threshold: float | None) -> dict[str, Any]:
        """The training-similarity distribution: quantiles (to a bin, 0.001), mean, max, and the count and
        share above `threshold` (counted exactly, per row)."""
        n = int(self.sim_hist.sum())
        out: dict[str, Any] = {"samples": n, "unmeasured_samples": self.rows - n}
        if not n:
            return out
        cum = np.cumsum(self.sim_hist)
        edges = np.linspace(-1.0, 1.0, SIM_BINS + 1)
        quantiles = {}
        for q in (0.5, 0.9, 0.99):
            b = int(np.searchsorted(cum, q * n))  # the bin holding the q-quantile; its upper edge, capped at the max
            quantiles[f"p{round(q * 100)}"] = round(min(float(edges[b + 1]), self.sim_max), 4)
        coarse = self.sim_hist.reshape(-1, 20).sum(1)  # 0.02-wide bins for the plot
        out |= {
            "quantiles": quantiles,
            "mean": round(self.sim_sum / n, 4),
            "max": round(self.sim_max, 4),
            "above_threshold": self.sim_above if threshold is not None else None,
            "share_above": self.sim_above / n if threshold is not None else None,
            "histogram": {
                "edges": np.linspace(-1.0, 1.0, len(coarse) + 1).round(2).tolist(),
                "counts": coarse.tolist(),
            },
        }
        return out


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


def aggregate_table(table: pa.Table, threshold: int, sim_threshold: float | None = None) -> SampleAggregates:
    """Reduce the rows of one parquet to a SampleAggregates (pure numpy, no per-row Python); training
    similarity above `sim_threshold` is counted."""
    agg = SampleAggregates(rows=table.num_rows)
    if not table.num_rows:
        return agg
    if "training_similarity" in table.column_names:
        sim = table["training_similarity"].drop_null().to_numpy().astype(np.float64)
        if len(sim):
            bins = np.clip(((sim + 1.0) / 2.0 * SIM_BINS).astype(np.int64), 0, SIM_BINS - 1)
            agg.sim_hist = np.bincount(bins, minlength=SIM_BINS)
            agg.sim_sum, agg.sim_max = float(sim.sum()), float(sim.max())
            agg.sim_above = int((sim > sim_threshold).sum()) if sim_threshold is not None else 0
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
    """The needed columns of one shard's parquet (those of OPTIONAL_COLUMNS it has), or a ReportError
    naming the file and the fix."""
    path = layout.parquet(name)
    try:
        with (fs or arrow_filesystem(layout)).open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            have = set(pf.schema_arrow.names)
            return pf.read(columns=[c for c in COLUMNS if c in have or c not in OPTIONAL_COLUMNS], use_threads=False)
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


def aggregate_shards(
    layout: Layout, names: list[str], threshold: int, threads: int = 4, sim_threshold: float | None = None
) -> SampleAggregates:
    """Sum the per-file aggregates of the given committed shards."""
    fs = arrow_filesystem(layout)
    total = SampleAggregates()
    if not names:
        return total

    def one(name: str) -> SampleAggregates:
        return aggregate_table(read_parquet(layout, name, fs), threshold, sim_threshold)

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


#: build.json without a `training_similarity` entry was written before the leakage check existed.
NOT_RECORDED = "this build predates the identity-leakage check (build.json does not record it)"


def similarity_threshold(record: dict[str, Any]) -> tuple[float | None, str | None]:
    """The threshold the report counts training similarity above, and what it is: the identity encoder's
    verification threshold (from its spec) where it has one, else checks.training_similarity, else none."""
    leak = record.get("training_similarity") or {}
    if leak.get("verify_threshold") is not None:
        return float(leak["verify_threshold"]), f"the verification threshold of {leak['identity_encoder']} (its spec)"
    if leak.get("check") is not None:
        return float(leak["check"]), "checks.training_similarity (the encoder's spec gives no verification threshold)"
    return None, None


def leakage_summary(record: dict[str, Any], agg: SampleAggregates, rejected: int) -> dict[str, Any]:
    """Identity leakage over the accepted samples: the training-similarity distribution and how many
    lie above the verification threshold, or why the build did not measure it."""
    leak = record.get("training_similarity")
    if leak is None:
        return {"measured": False, "why": NOT_RECORDED}
    out = {k: leak.get(k) for k in ("measured", "why", "identity_encoder", "subjects", "check", "data")}
    if not leak.get("measured"):
        return out
    threshold, source = similarity_threshold(record)
    return out | {"threshold": threshold, "threshold_source": source, "rejected": rejected} | agg.similarity(threshold)
