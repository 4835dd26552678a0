"""Shared helpers: run the real `factory` CLI in a subprocess, small Ray footprints."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

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
