"""Puppet renderer throughput on one CPU core: images/s at 64, 128 and 256 px.

Budget: >= 200 images/s per core at 64 px (< 5 ms per render, downsample included).
Every render uses a new random identity (no layout cache hits) and random intensities, as the
factory's shards do. Run: python bench/bench_puppet.py [--n 2000] [--supersample 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.facs import NUM_AUS  # noqa: E402
from pipelines.puppet import PuppetRenderer, sample_identity  # noqa: E402

BUDGET_PER_S = 200.0


def pin_one_core() -> str:
    """Pin this process to one core so the rate is per core (no hidden BLAS/PIL threads help)."""
    if hasattr(os, "sched_setaffinity"):
        core = sorted(os.sched_getaffinity(0))[0]
        os.sched_setaffinity(0, {core})
        return f"pinned to core {core}"
    return "not pinned (no sched_setaffinity on this platform)"


def bench(size: int, n: int, supersample: int, seed: int = 0) -> tuple[float, float]:
    """(renders per second, identity samples per second) for n random people at `size`."""
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    ids = [sample_identity(rng) for _ in range(n)]
    t_ids = time.perf_counter() - t
    ints = rng.integers(0, 6, (n, NUM_AUS)).astype(np.float32)
    r = PuppetRenderer(size=size, supersample=supersample)
    r.render(ids[0], ints[0])  # warm-up (imports, first allocations)
    r = PuppetRenderer(size=size, supersample=supersample)  # fresh caches: every identity is new
    t = time.perf_counter()
    for ident, v in zip(ids, ints):
        r.render(ident, v)
    dt = time.perf_counter() - t
    return n / dt, n / t_ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000, help="renders at 64 px (128/256 px use n/4 and n/10)")
    ap.add_argument("--supersample", type=int, default=4)
    a = ap.parse_args()
    print(f"puppet renderer bench: {platform.python_version()}, {platform.machine()}, {pin_one_core()}")
    for size, n in ((64, a.n), (128, max(50, a.n // 4)), (256, max(20, a.n // 10))):
        rate, id_rate = bench(size, n, a.supersample)
        line = f"  {size:3d} px x{a.supersample} supersample: {rate:7.1f} images/s per core ({1000.0 / rate:.2f} ms/image, n={n})"
        if size == 64:
            line += f"; budget {BUDGET_PER_S:.0f}/s -> ratio {rate / BUDGET_PER_S:.2f}"
            line += f"; sample_identity {id_rate:.0f}/s"
        print(line)


if __name__ == "__main__":
    main()
