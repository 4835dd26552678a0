"""`factory report` over a synthetic 1,000,000-row manifest: wall time and peak memory vs a 10 s budget.

The manifest is made in the real layout, outside the timed part: build.json from the project's
own `prepare_output`, 1000 shards of 1000 parquet rows in the writer's PARQUET_SCHEMA, a stats
marker per shard as `run_shard` writes it, and a small webdataset tar per shard (its first 4
samples only; the report reads no more than the head of a few tars). Then the real CLI,
`factory report OUT --html R.html --json`, runs in a child process, timed end to end (Python
start and imports included); peak RSS is the child's.

    python bench/bench_report.py [--shards 1000] [--rows 1000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.facs import AUS
from factory.config import load_config
from factory.record import prepare_output
from factory.layout import Layout
from factory.plan import GRID, Plan
from factory.checks import REASONS
from factory.writer import DETECT_COLUMNS, PARQUET_SCHEMA, au_array, encode_image

log = logging.getLogger("bench_report")
BUDGET_S = 10.0
N_AU = len(AUS)
TAR_SAMPLES = 4


def _fixed(values: np.ndarray, typ: pa.DataType) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel(), type=typ), N_AU)


def shard_table(rng: np.random.Generator, index: int, rows: int, thr: int) -> tuple[pa.Table, dict]:
    """One shard's parquet rows (random but well-formed labels) and the sums its marker holds."""
    target = rng.integers(0, 6, size=(rows, N_AU)).astype(np.int8) * (rng.random((rows, N_AU)) < 0.35)
    inten = np.clip(target + rng.normal(0, 0.4, size=target.shape), 0, 5).astype(np.float32)
    occ = inten >= thr
    cells = rng.integers(0, GRID.size, rows)
    emo = np.asarray(GRID.emotions)[GRID.emotion_of(cells)]
    age = np.asarray(GRID.age_groups)[GRID.age_of(cells)]
    name = f"mifa-{index:06d}"
    keys = [f"{name}-{i:07d}" for i in range(rows)]
    cols = {
        "key": pa.array(keys),
        "shard": pa.array(np.full(rows, index, np.int32)),
        "candidate": pa.array(np.arange(rows, dtype=np.int32)),
        "seed": pa.array(rng.integers(0, 2**62, rows)),
        "emotion": pa.array(emo),
        "strength": pa.array(rng.integers(0, 5, rows).astype(np.int8)),
        "skin_group": pa.array(GRID.skin_of(cells).astype(np.int8)),
        "age_group": pa.array(age),
        "prompt": pa.array(np.char.add("A face with AU pattern ", rng.integers(0, 10**6, rows).astype(str))),
        "expander": pa.array(["grammar"] * rows),
        "expand_fallback": pa.array(np.zeros(rows, bool)),
        "target_intensity": _fixed(target, pa.int8()),
        "intensity": _fixed(inten, pa.float32()),
        "occurrence": _fixed(occ, pa.bool_()),
        "prompt_target_jaccard": pa.array(np.ones(rows, np.float32)),
        "label_prompt_jaccard": pa.array(np.ones(rows, np.float32)),
        "identity": pa.array(["{}"] * rows),
        "generator": pa.array(["puppet@bench"] * rows),
    }
    for c in DETECT_COLUMNS:
        cols[c] = pa.nulls(rows, PARQUET_SCHEMA.field(c).type)
    table = pa.table(cols, schema=PARQUET_SCHEMA)
    sums = {
        "per_au": {
            "target_occ": (target >= thr).sum(0).tolist(),
            "target_int": target.sum(0).astype(float).tolist(),
            "occ": occ.sum(0).tolist(),
            "int": inten.sum(0).astype(float).tolist(),
        },
        "emotions": {e: int((emo == e).sum()) for e in GRID.emotions},
        "skin_groups": {str(s): int((GRID.skin_of(cells) == s).sum()) for s in range(GRID.skin_groups)},
        "age_groups": {a: int((age == a).sum()) for a in GRID.age_groups},
        "keys": keys[:TAR_SAMPLES],
        "occ": occ[:TAR_SAMPLES],
        "inten": inten[:TAR_SAMPLES],
    }
    return table, sums


def write_tar(layout: Layout, name: str, sums: dict, rng: np.random.Generator) -> None:
    """A small but real webdataset tar: the shard's first samples (image, KEY.json, KEY.au.npy)."""
    with layout.fs.open(layout.tar(name), "wb") as f, wds.TarWriter(f, encoder=False) as tw:
        for j, key in enumerate(sums["keys"]):
            img = np.zeros((64, 64, 3), np.uint8) + rng.integers(40, 220, 3, dtype=np.uint8)
            img[16:48, 16:48] = 255 - img[0, 0]
            meta = {
                "key": key,
                "emotion": "neutral",
                "strength": 0,
                "prompt": f"synthetic bench sample {key}",
                "labels": {
                    "occurrence": sums["occ"][j].astype(int).tolist(),
                    "intensity": sums["inten"][j].round(2).tolist(),
                },
                "identity": {"skin_group": 0, "age_group": "adult"},
                "scores": {"prompt_target_jaccard": 1.0},
            }
            tw.write(
                {
                    "__key__": key,
                    "png": encode_image(img, "png"),
                    "json": json.dumps(meta).encode(),
                    "au.npy": au_array(sums["occ"][j], sums["inten"][j]),
                }
            )


def make_manifest(out: str, shards: int, rows: int) -> None:
    cfg = load_config(None, [f"build.target={shards * rows}", f"build.shard_size={rows}", "generator=puppet"])
    layout, record = prepare_output(cfg, out)
    plan = Plan(cfg)
    assert plan.num_shards == shards
    thr = cfg.labels.occurrence_threshold
    rng = np.random.default_rng(0)
    nodes = [f"node-{i}" for i in range(4)]
    t0 = 1.7e9
    for i in range(shards):
        name = plan.shard_name(i)
        table, sums = shard_table(rng, i, rows, thr)
        write_tar(layout, name, sums, rng)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        layout.write_bytes_atomic(layout.parquet(name), buf.getvalue())
        rej = {r: int(rng.integers(0, 60)) for r in REASONS}
        cand = rows + sum(rej.values())
        left, funnel = cand, {"candidates": cand}
        for stage, reason in (
            ("expand", "prompt_target_jaccard"),
            ("generate_valid", "invalid_image"),
            ("realism", "realism"),
            ("label_prompt", "label_prompt_jaccard"),
            ("label_consensus", "label_consensus_jaccard"),
        ):
            left -= rej[reason]
            funnel[stage] = left
        funnel |= {"checks": rows + rej["over_quota"], "accepted": rows}
        start = t0 + (i // len(nodes)) * 30.0 + rng.random()
        stats = {
            "name": name,
            "index": i,
            "build_id": record["build_id"],
            "size": rows,
            "candidates": cand,
            "rejected": rej,
            "rejected_examples": {
                r: [f"{name}-{rows + k:07d}" for k in range(min(n, 200))] for r, n in rej.items() if n
            },
            "funnel": funnel,
            "per_au": sums["per_au"],
            "emotions": sums["emotions"],
            "skin_groups": sums["skin_groups"],
            "age_groups": sums["age_groups"],
            "expand": {"requests": cand},
            "generator": "puppet@bench",
            "node": nodes[i % len(nodes)],
            "attempt": 1,
            "timings": {"start": round(start, 3), "end": round(start + 25 + rng.random() * 5, 3)},
            "committed": True,
            "samples": rows,
        }
        layout.write_json_atomic(layout.stats(name), stats)
    # a leftover of a build still running: the report must ignore it
    (Path(out) / "shards" / ".tmp-mifa-999999.tar.abc").write_bytes(b"partial")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--keep", help="make (or reuse) the manifest in this directory and keep it")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.keep or tempfile.mkdtemp(prefix="bench-report-")
    try:
        if not (Path(out) / "build.json").exists():
            t = time.perf_counter()
            make_manifest(out, args.shards, args.rows)
            log.info(
                "made %d shards x %d rows in %s in %.1f s (not timed)",
                args.shards,
                args.rows,
                out,
                time.perf_counter() - t,
            )
        html = str(Path(out) / "report.html")
        cmd = [sys.executable, "-m", "factory.cli", "report", out, "--html", html, "--json"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"report failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        rep = json.loads(proc.stdout)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        rows = rep["figures"]["au_occurrence"]["rows"]
        assert rows == args.shards * args.rows, rows
        log.info(
            "report over %d rows, %d shards: HTML %.0f kB, %d accepted and %d rejected sample cards",
            rows,
            rep["shards"]["done"],
            Path(html).stat().st_size / 1e3,
            len(rep["samples"]["accepted"]),
            len(rep["samples"]["rejected"]),
        )
        log.info("wall %.2f s (budget %.0f s, ratio %.2f), peak RSS %.0f MB", wall, BUDGET_S, wall / BUDGET_S, peak_mb)
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
