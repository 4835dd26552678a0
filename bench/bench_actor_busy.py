"""Where a build's time goes: each actor's busy fraction and each shard stage's share, in one run;
with --vs-one, the default sizing against one generator actor, in the same run.

Runs a build on an embedded local Ray (`run_build`, the same code as `factory build`) and prints:
- the actors it started (runtime sizing: `auto` resolved against this machine);
- each generator and detector actor's busy fraction (seconds inside generate()/detect() over the
  shard window: first shard submitted to last shard finished; the aim for generators is > 0.9
  while shards remain, i.e. the costly stage never waits on the rest of the graph);
- the shard tasks' seconds per stage (expand, generate, detect, checks, write) summed over the
  committed shards, as shares: `generate` and `detect` there include waiting for a busy actor;
- the generator stage's images/s: all generators' images over the shard window (the stage's
  throughput), and per actor (images over its seconds inside generate()); accepted samples/s of
  the whole graph; the acceptance of every check stage;
- the build's load while its shards ran (bench/procstat.py): the cores its processes kept busy,
  its own run queue (running + runnable threads: what the load average counts, of this build
  alone) and the machine's 1-minute load average, which counts every other process as well.

--vs-one first runs the same build with `runtime.num_generators=1` (the sizing before `auto`: one
generator actor, one core), then as configured (by default `auto`), into fresh folders, and prints
the ratio of the generator stage's images/s and whether both wrote the same corpus (they must:
runtime keys never change a shard's bytes). With `generator=maugen` (the default) on a CPU the
generator is the costly stage, as the GPU generators are on a cluster; with `generator=puppet`
detection is. A measurement of this one run, not a test; other load on the machine distorts it
(each run prints how many cores other processes took meanwhile). Ray starts its workers, the
actors among them, at nice 15, so on a machine shared with other work the actors get what that
work leaves; the bench starts its Ray's workers at `--ray-niceness` 0, as other processes run.

    python bench/bench_actor_busy.py --target 96 --shard-size 8 --vs-one [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from corpus_digest import digest  # noqa: E402
from procstat import TreeSampler, Window  # noqa: E402

from factory.checks import REASONS  # noqa: E402
from factory.config import load_config  # noqa: E402
from factory.graph import BuildSummary, run_build  # noqa: E402

STAGES = ("expand", "generate", "detect", "checks", "write")


@dataclass
class Run:
    label: str
    out: str
    summary: BuildSummary
    load: Window | None

    @property
    def images_per_s(self) -> float:
        """The generator stage's throughput: all generators' images over the shard window."""
        s = self.summary
        return sum(g.images for g in s.generators) / s.shards_seconds if s.shards_seconds > 0 else 0.0


def run(label: str, sets: list[str], out: str) -> Run:
    cfg = load_config(None, sets)
    sampler = TreeSampler()
    sampler.start()
    try:
        s = run_build(cfg, out, new_build=True)
    finally:
        sampler.stop()
    stats = [json.loads(p.read_text()) for p in sorted((Path(out) / "shards").glob("*.stats.json"))]
    t0 = min(st["timings"]["start"] for st in stats) if stats else 0.0
    t1 = max(st["timings"]["end"] for st in stats) if stats else 0.0
    r = Run(label, out, s, sampler.window(t0, t1))
    report(r, stats, sets)
    return r


def report(r: Run, stats: list[dict], sets: list[str]) -> None:
    s = r.summary
    print(f"{r.label}: --set {' '.join(sets)}")
    if s.sizing is not None:
        print(f"  sizing: {s.sizing.describe()}")
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
        print(f"  generator stage: {r.images_per_s:.2f} images/s ({images} images by {len(s.generators)} actors in the "
              f"{s.shards_seconds:.1f} s shard window), {images / gen_s:.2f} images/s per actor inside "
              f"generate(); whole graph: {s.accepted / s.shards_seconds:.2f} accepted "
              f"samples/s, {s.candidates / s.shards_seconds:.2f} candidates/s")  # fmt: skip
    if r.load is not None:
        print(f"  load while shards ran: {r.load.describe()}")
    print(f"  output: {r.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=int, default=96)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--out", help="local output folder (default: a fresh temporary one)")
    ap.add_argument("--vs-one", action="store_true", help="first the same build with runtime.num_generators=1")
    ap.add_argument("--ray-niceness", type=int, default=0, help="nice value of Ray's workers (Ray's default: 15)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ["RAY_worker_niceness"] = str(a.ray_niceness)  # read by the local Ray run_build starts

    print(f"Ray's workers at nice {a.ray_niceness}, on {os.cpu_count()} CPUs")
    base = a.out or tempfile.mkdtemp(prefix="mifa-busy-")
    sets = ["runtime.progress=false", *a.set, f"build.target={a.target}", f"build.shard_size={a.shard_size}"]
    if not a.vs_one:
        run("build", sets, base)
        return
    one = run("one generator actor", [*sets, "runtime.num_generators=1"], f"{base}/one")
    sized = run("as configured (default: auto)", sets, f"{base}/sized")
    ratio = sized.images_per_s / one.images_per_s if one.images_per_s > 0 else float("nan")
    same = digest(Path(one.out)) == digest(Path(sized.out))
    print(f"generator stage images/s: {sized.images_per_s:.2f} with {len(sized.summary.generators)} actors vs "
          f"{one.images_per_s:.2f} with 1: {ratio:.2f}x; the same corpus, byte for byte: {'yes' if same else 'NO'}")  # fmt: skip
    if sized.load is not None and one.load is not None:
        print(f"build's run queue while shards ran: {sized.load.run_queue:.2f} vs {one.load.run_queue:.2f}; cores busy "
              f"{sized.load.cores_busy:.2f} vs {one.load.cores_busy:.2f}; other processes' cores busy "
              f"{sized.load.others_busy:.2f} vs {one.load.others_busy:.2f}")  # fmt: skip
        if sized.load.stopped_s or one.load.stopped_s:
            print("a build was stopped by a signal from outside while its shards ran: the ratio is not a measurement")


if __name__ == "__main__":
    main()
