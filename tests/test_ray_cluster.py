"""The same CLI on a running Ray cluster (token auth on): RAY_ADDRESS and `ray job submit`."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, factory, wait_for_port

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path):
    """A one-node Ray head on loopback, token auth on, stopped by process group at the end."""
    token = secrets.token_hex(16)
    gcs, dash = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2", "--object-store-memory=100000000",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_port(dash, head)
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "token": token}
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(5)  # `ray start --block` often outlives SIGTERM by far longer: not worth waiting
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        time.sleep(1.0)
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of the group that outlived its parent
        except ProcessLookupError:
            pass


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
