"""bench/gpu.sh in its dry mode: every step (stock vs MAUGen generator rows, the detector panel, a short
factory build) runs on the CPU at toy size, so the script a GPU machine will run cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT

ROW = re.compile(r"^(base|pab)\s+(float32|bfloat16)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", re.M)


def test_gpu_bench_dry_mode_runs_every_step_on_the_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MIFA_FAULTS", "MIFA_INJECT")}
    env |= {"PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--dry"],
        env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    rows = ROW.findall(out)
    assert {(v, d, int(b)) for v, d, b, *_ in rows} == {("base", "float32", 1), ("base", "bfloat16", 1), ("pab", "float32", 1)}, out
    assert all(float(x) > 0 for row in rows for x in row[3:])  # stock, maugen, ratio, maugen-build
    for batch in (8, 16):
        assert re.search(rf"detectors: .* batch {batch}: \d+ images/s through the panel \(CPUExecutionProvider", out)
    build = re.search(r"build: (\d+) accepted samples \((\d+) candidates\) .* = ([\d.]+) accepted samples/s", out)
    assert build and int(build.group(1)) == 2 and float(build.group(3)) > 0, out
    assert re.search(r"^  generator 0 busy [\d.]+ .*\n  detector 0 busy", out, re.M)
    assert re.search(r"bench/gpu.sh: done in \d+ s", out)
    assert not list(tmp_path.iterdir())  # its work folder (random SD weights, checkpoint, build) is removed
