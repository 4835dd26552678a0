"""Where a build's time goes: each actor's busy fraction and each shard stage's share, in one run.

Runs one build on an embedded local Ray (`run_build`, the same code as `factory build`) and prints:
- each generator and detector actor's busy fraction (seconds inside generate()/detect() over the
  shard window: first shard submitted to last shard finished; the aim for generators is > 0.9
  while shards remain, i.e. the costly stage never waits on the rest of the graph);
- the shard tasks' seconds per stage (expand, generate, detect, checks, write) summed over the
  committed shards, as shares: `generate` and `detect` there include waiting for a busy actor;
- images/s of the generator stage alone (images / seconds inside generate()) against accepted
  samples/s of the whole graph over the shard window, and the acceptance of every check stage.

With `generator=maugen` on a CPU the generator is the costly stage, as the GPU generators are on
a cluster; with `generator=puppet` detection is. A measurement of this one run, not a test.

    python bench/bench_actor_busy.py --target 96 --shard-size 16 --set generator=maugen [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factory.config import load_config  # noqa: E402
from factory.graph import run_build  # noqa: E402
from factory.checks import REASONS  # noqa: E402

STAGES = ("expand", "generate", "detect", "checks", "write")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=int, default=96)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--out", help="local output folder (default: a fresh temporary one)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    out = a.out or tempfile.mkdtemp(prefix="mifa-busy-")
    sets = ["runtime.progress=false", *a.set, f"build.target={a.target}", f"build.shard_size={a.shard_size}"]
    cfg = load_config(None, sets)
    s = run_build(cfg, out, new_build=True)
    stats = [json.loads(p.read_text()) for p in sorted((Path(out) / "shards").glob("*.stats.json"))]

    print(f"build: generator={cfg.generator}, target {a.target}, shard size {a.shard_size}, --set {' '.join(a.set)}")
    print(f"  {s.committed}/{s.num_shards} shards, {s.accepted} accepted of {s.candidates} candidates in "
          f"{s.seconds:.1f} s (shard window {s.shards_seconds:.1f} s); failed: {len(s.failed)}")  # fmt: skip
    left = s.candidates
    for reason in REASONS:  # graph order, so each share is of the candidates that reached that check
        n = s.rejected.get(reason, 0)
        if n:
            print(f"  {reason:<24} rejected {n:>6} of {left:>6} ({n / left:.1%})")
            left -= n
    for b in [*s.generators, *s.detectors]:
        print(f"  {b.describe()}")
    total = {k: sum(float(st["timings"].get(k, 0.0)) for st in stats) for k in STAGES}
    whole = sum(total.values())
    if whole > 0:
        print("  shard-task seconds per stage (summed over shards): " + ", ".join(
            f"{k} {v:.1f} s ({v / whole:.0%})" for k, v in total.items()))  # fmt: skip
    gen_s = sum(b.busy_s for b in s.generators)
    images = sum(b.images for b in s.generators)
    if gen_s > 0 and s.shards_seconds > 0:
        alone = images / gen_s
        graph = s.accepted / s.shards_seconds
        print(f"  generator stage alone: {alone:.2f} images/s per actor ({images} images in {gen_s:.1f} s); "
              f"whole graph: {graph:.2f} accepted samples/s, {s.candidates / s.shards_seconds:.2f} candidates/s")  # fmt: skip
    print(f"  output: {out}")


if __name__ == "__main__":
    main()
