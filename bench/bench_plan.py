"""Planning a 1,000,000-sample build with --dry-run: wall time and peak RSS of the CLI process.

Budget (issue 2): under 5 s and 300 MB. Run: python bench/bench_plan.py [--target N]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

BUDGET_S = 5.0
BUDGET_MB = 300.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=int, default=1_000_000)
    ap.add_argument("--shard-size", type=int, default=1000)
    a = ap.parse_args()
    cmd = [sys.executable, "-m", "factory.cli", "build", "--dry-run", "--target", str(a.target)]
    cmd += ["--shard-size", str(a.shard_size)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"dry-run plan of {a.target:,} samples ({a.shard_size} per shard): {wall:.2f} s, peak RSS {rss_mb:.0f} MB")
    print(
        f"  time / budget {BUDGET_S:.0f} s = {wall / BUDGET_S:.2f}; RSS / budget {BUDGET_MB:.0f} MB = {rss_mb / BUDGET_MB:.2f}"
    )


if __name__ == "__main__":
    main()
