"""The same CLI on a running Ray cluster (token auth on): RAY_ADDRESS and `ray job submit`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import RAY, ROOT, factory, ray_head


@pytest.fixture
def cluster():
    with ray_head(dashboard=True) as head:
        yield head


@pytest.mark.slow  # the default suite stays under 15 min; `bash tests/run.sh -m slow` runs it
def test_driver_with_ray_address_and_job_submit(cluster, tmp_path):
    # RAY_AUTH_MODE unset on the client: the driver finds the token and turns token auth on itself
    out = tmp_path / "a"
    env = {"RAY_ADDRESS": cluster["gcs"], "RAY_AUTH_TOKEN": cluster["token"], "RAY_AUTH_MODE": ""}
    p = factory("build", "--target", "40", "--shard-size", "20", "--out", str(out), "--set", "runtime.progress=false",
                "--set", "generator=puppet", env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "joining the Ray cluster" in p.stderr and len(list((out / "shards").glob("*.stats.json"))) == 2

    out2 = tmp_path / "b"
    submit_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster["token"]}
    submit_env.pop("RAY_ADDRESS", None)
    q = subprocess.run(
        [RAY, "job", "submit", "--address", cluster["dashboard"], "--",
         sys.executable, "-m", "factory.cli", "build", "--target", "40", "--shard-size", "20", "--out", str(out2),
         "--set", "runtime.progress=false", "--set", "generator=puppet"],
        cwd=ROOT, env=submit_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert q.returncode == 0, q.stdout[-3000:] + q.stderr[-3000:]
    assert "succeeded" in q.stdout + q.stderr
    factory("verify", str(out2), check=True)
