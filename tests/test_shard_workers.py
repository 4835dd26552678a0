"""Shard workers: long-lived actors that run the shard tasks (issue 7).

One process per shard in flight for the whole build, each shard handed the least-loaded generator
and detector on its worker's node, and a worker that dies mid-shard replaced while its shard is
re-run with attempt + 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, ROOT, factory, shard_stats
from netns_lab import runs_a_shard

from factory.graph import worker_lost
from factory.pool import StagePool, WorkerPool


def _pool(gen_nodes: list[str], det_nodes: list[str]) -> WorkerPool:
    gens = StagePool([f"g{i}" for i in range(len(gen_nodes))], gen_nodes)
    dets = StagePool([f"d{i}" for i in range(len(det_nodes))], det_nodes)
    return WorkerPool(gens, dets, cpus=0.25)


def _assign(pool: WorkerPool) -> tuple[int, int | None]:
    a = pool.assign()
    return a.generator, a.detector


def test_pool_hands_a_worker_the_least_loaded_actors_on_its_node():
    pool = _pool(["A", "A", "B"], ["B", "A"])
    pool.idle = [("w1", "A"), ("w2", "A"), ("w3", "A"), ("w4", "B"), ("w5", "C")]
    # generators 0, 1 on A, 2 on B; detectors 0 on B, 1 on A
    slots = [pool.assign()]
    assert (slots[0].generator, slots[0].detector) == (0, 1)
    assert _assign(pool) == (1, 1)  # generator 0 now serves one shard, 1 none
    assert _assign(pool) == (0, 1)  # tie between 0 and 1 goes to the lower index
    assert _assign(pool) == (2, 0)  # node B has its own generator and detector
    # node C has neither: the least-loaded anywhere (generators 1 and 2 serve one shard each,
    # detector 0 one and detector 1 three)
    assert _assign(pool) == (1, 0)
    assert pool.generators.load == [2, 2, 1] and pool.detectors.load == [2, 3] and not pool.idle
    pool.release(slots[0])
    assert pool.generators.load == [1, 2, 1] and pool.detectors.load == [2, 2]
    assert pool.idle == [("w1", "A")]  # its worker is idle again
    assert pool.generators.actor(1) == "g1" and pool.detectors.actor(None) is None


def test_pool_without_detectors():
    pool = _pool(["A"], [])
    pool.idle = [("w", "A")]
    a = pool.assign()
    assert (a.worker, a.node, a.generator, a.detector) == ("w", "A", 0, None)
    pool.release(a, worker_alive=False)
    assert pool.generators.load == [0] and not pool.idle


def test_worker_lost_tells_a_dead_worker_from_a_failing_shard():
    import ray.exceptions as rex

    died = rex.ActorDiedError()
    assert worker_lost(died)
    assert worker_lost(rex.ActorUnavailableError("unreachable", None))
    # the generator died under the shard: Ray wraps it in a RayTaskError that is also an
    # ActorDiedError, but the shard worker itself is alive
    wrapped = rex.RayTaskError("ShardWorker.run", "traceback", died).as_instanceof_cause()
    assert isinstance(wrapped, rex.ActorDiedError) and not worker_lost(wrapped)
    assert not worker_lost(rex.RayTaskError("ShardWorker.run", "traceback", ValueError("bad")))
    assert not worker_lost(ValueError("bad"))


@pytest.mark.slow  # the default suite stays under 15 min; `bash tests/run.sh -m slow` runs it
def test_one_worker_process_per_shard_in_flight_for_the_whole_build(shared_ray, tmp_path):
    """Ten shards, two in flight: two shard workers build all of them (a Ray task per shard could
    land on a fresh worker process each time, re-importing torch and the factory)."""
    out = tmp_path / "out"
    args = ["--target", "200", "--shard-size", "20", "--out", str(out), *FAST,
            "--set", "runtime.max_shards_in_flight=2"]  # fmt: skip
    factory("build", *args, env=shared_ray, check=True)
    stats = shard_stats(out)
    assert len(stats) == 10
    workers = {s["worker_id"] for s in stats.values()}
    assert len(workers) == 2 and all(len(w) == 32 for w in workers), workers  # Ray actor ids, hex
    assert all(s["attempt"] == 1 for s in stats.values())


def _worker_running_a_shard() -> int | None:
    return next((int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and runs_a_shard(int(d.name))), None)


def test_worker_killed_mid_shard_is_replaced_and_its_shard_redone(tmp_path):
    """SIGKILL a shard worker while it runs a shard: the driver starts another worker, re-runs the
    shard with attempt 2, and the build finishes whole."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("MIFA_FAULTS", "MIFA_INJECT")}
    args = ["--target", "600", "--shard-size", "50", "--out", str(out), *FAST]
    proc = subprocess.Popen(
        [sys.executable, "-m", "factory.cli", "build", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        victim = None
        deadline = time.time() + 240
        while victim is None and proc.poll() is None and time.time() < deadline:
            if (out / "shards").is_dir() and len(list((out / "shards").glob("*.stats.json"))) >= 2:
                victim = _worker_running_a_shard()
            time.sleep(0.05)
        assert victim is not None, "no shard worker was seen running a shard"
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-4000:]
    assert "a shard worker was lost" in err, err[-4000:]
    stats = shard_stats(out)
    assert len(stats) == 12 and sum(s["samples"] for s in stats.values()) == 600
    assert any(s["attempt"] == 2 for s in stats.values())  # the shard it was running, redone
    assert 2 <= len({s["worker_id"] for s in stats.values()}) <= 3  # the survivor, maybe the replacement
    factory("verify", str(out), check=True)
    assert not list(out.rglob(".tmp-*"))  # the killed attempt's temporary tar, swept at the end


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
