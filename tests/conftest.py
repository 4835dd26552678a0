"""Shared helpers: run the real `factory` CLI in a subprocess, small Ray footprints."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))  # this venv's `ray`

# Small builds on a 2-core machine.
#: Runtime options only (a resume may set them too): a modest object store, no progress bar.
SMALL_RAY = ["--set", "runtime.object_store_mb=100", "--set", "runtime.progress=false"]
#: Build options of the tests about the factory itself: the exact, fast puppet generator (the
#: default generator is the trained MAUGen, far slower on a CPU).
FAST = ["--set", "generator=puppet", *SMALL_RAY]


def factory(*args: str, env: dict[str, str] | None = None, timeout: float = 600, check: bool = False):
    """Run `python -m factory.cli ARGS`; returns the CompletedProcess (stdout/stderr as text)."""
    full_env = dict(os.environ)
    full_env.pop("MIFA_FAULTS", None)
    full_env.pop("MIFA_INJECT", None)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "factory.cli", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"factory {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def factory_on_a_terminal(*args: str, timeout: float = 600) -> tuple[int, str]:
    """Run `python -m factory.cli ARGS` on a pseudo-terminal (util-linux `script`), as a person at a
    terminal sees it; returns (exit code, everything it printed, ANSI codes and all)."""
    env = dict(os.environ)
    for k in ("MIFA_FAULTS", "MIFA_INJECT", "MIFA_VERBOSE"):
        env.pop(k, None)
    command = shlex.join([sys.executable, "-m", "factory.cli", *args])
    proc = subprocess.run(
        ["script", "-qfec", command, "/dev/null"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    return proc.returncode, proc.stdout + proc.stderr


def shard_stats(out: Path) -> dict[str, dict]:
    """The committed shards' stats markers of a local build, by shard name (mifa-000001), in order."""
    markers = sorted((out / "shards").glob("*.stats.json"))
    return {p.name[: -len(".stats.json")]: json.loads(p.read_text()) for p in markers}


@pytest.fixture
def run_factory():
    return factory


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until 127.0.0.1:port accepts connections (a `ray start --head` dashboard), while `proc` lives."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert proc.poll() is None, "ray start exited"
        time.sleep(0.3)
    raise AssertionError("the Ray dashboard never came up")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(dashboard: bool = False) -> Iterator[dict[str, str]]:
    """A one-node Ray head on loopback (2 CPUs, a 100 MB object store, token auth on), stopped by process
    group at the end: {"gcs", "token", "dashboard" (a URL, or "" without one)}."""
    token = secrets.token_hex(16)
    gcs, dash = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    for k in ("RAY_ADDRESS", "MIFA_FAULTS", "MIFA_INJECT", "OPENAI_API_KEY"):  # its workers have none of the driver's
        env.pop(k, None)
    ui = [f"--include-dashboard={str(dashboard).lower()}"]
    if dashboard:
        ui += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"]
    # free ports for what would otherwise take Ray's fixed defaults (the job agent's 52365, the client
    # server's 10001, ...), so that a head kept for the session leaves them to the clusters tests start
    ui += [f"--{name}={_free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                   "metrics-export-port", "runtime-env-agent-port",
                                                   "ray-client-server-port")]  # fmt: skip
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2", "--object-store-memory=100000000",
         *ui, "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_port(dash if dashboard else gcs, head)
        url = f"http://127.0.0.1:{dash}" if dashboard else ""
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": url, "token": token}
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


@pytest.fixture(scope="session")
def shared_ray() -> Iterator[dict[str, str]]:
    """The env with which a `factory` command joins one Ray head kept for the whole session, as a driver
    with RAY_ADDRESS set does (RAY_AUTH_MODE unset: the driver turns token auth on itself), instead of
    starting an embedded local Ray of its own: about 8 s less per build on 2 cores. For the tests about
    the factory's own logic; tests of what a driver's embedded Ray does (killing its process group, a
    private mount namespace, the driver's own env) start their own."""
    with ray_head() as head:
        yield {"RAY_ADDRESS": head["gcs"], "RAY_AUTH_TOKEN": head["token"], "RAY_AUTH_MODE": ""}


@pytest.fixture(scope="session")
def s3_env() -> Iterator[tuple[dict[str, str], Any]]:
    """A moto S3 server on a free loopback port: (env for `factory` subprocesses, an s3fs client).

    The env is the standard AWS one only (AWS_ENDPOINT_URL + fake credentials), which botocore and
    so s3fs honour. Buckets are per test module; the client lists without a cache, since the
    subprocesses write what it lists.
    """
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
    s3fs = pytest.importorskip("s3fs", reason="s3fs is a dependency")
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
    }
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=url, use_listings_cache=False)
    try:
        yield env, fs
    finally:
        server.stop()
