"""bench/gpu.sh in its dry mode: every step (stock vs MAUGen generator rows, the detector panel, a short
factory build) runs on the CPU at toy size, so the script a GPU machine will run cannot rot.

Marked slow (about 50 s, most of it three Python starts and a Ray start), so the default suite stays
under 15 minutes on 2 cores; CI runs it as its own step after the default suite (.ci/run)."""

from __future__ import annotations

import os
import re
import subprocess
import shutil
import sys
import tempfile

import pytest

from conftest import ROOT

ROW = re.compile(r"^(base|pab)\s+(float32|bfloat16)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", re.M)


@pytest.mark.slow
def test_gpu_bench_dry_mode_runs_every_step_on_the_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MIFA_FAULTS", "MIFA_INJECT")}
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay under 108 characters
    env |= {"PYTHON": sys.executable, "TMPDIR": str(tmp_path), "RAY_TMPDIR": ray_tmp}
    try:
        proc = subprocess.run(
            ["bash", str(ROOT / "bench" / "gpu.sh"), "--dry"],
            env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = proc.stdout
    said = [ln for ln in (out + proc.stderr).splitlines() if "Error" in ln or ln.startswith("bench/gpu.sh:")]
    assert proc.returncode == 0, "\n".join(said[-20:])
    rows = ROW.findall(out)
    assert {(v, d, int(b)) for v, d, b, *_ in rows} == {("base", "float32", 1), ("base", "bfloat16", 1), ("pab", "float32", 1)}, out
    assert all(float(x) > 0 for row in rows for x in row[3:])  # stock, maugen, ratio, maugen-build
    for batch in (8, 16):
        assert re.search(rf"detectors: .* batch {batch}: \d+ images/s through the panel \(CPUExecutionProvider", out)
    build = re.search(r"build: (\d+) accepted samples \((\d+) candidates\) .* = ([\d.]+) accepted samples/s", out)
    assert build and int(build.group(1)) == 2 and float(build.group(3)) > 0, out
    assert re.search(r"^  generator 0 busy [\d.]+ .*\n  detector 0 busy", out, re.M)
    assert re.search(r"bench/gpu.sh: done in \d+ s", out)
    assert not list(tmp_path.glob("mifa-gpu.*"))  # its work folder (random SD weights, checkpoint, build) is removed
