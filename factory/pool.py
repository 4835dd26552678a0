"""Who runs where: one pool per model stage (generators, detectors) and the pool of shard workers.

A shard gets the least-loaded generator and detector on its worker's node (any node when its own
has none), so shards on a multi-host cluster stay node-local and spread over the actors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .actors import ShardWorker, short_error

log = logging.getLogger(__name__)


class StagePool:
    """The actors of one stage, the node each runs on, and how many shards in flight each serves."""

    def __init__(self, actors: list[Any], nodes: list[str]) -> None:
        if len(actors) != len(nodes):
            raise ValueError(f"{len(actors)} actors but {len(nodes)} node ids")
        self.actors, self.nodes = actors, list(nodes)
        self.load = [0] * len(actors)

    def __len__(self) -> int:
        return len(self.actors)

    def take(self, node: str) -> int | None:
        """The least-loaded actor on `node` (else anywhere; ties to the lowest index), now serving one
        shard more; None for an empty stage."""
        if not self.actors:
            return None
        local = [j for j in range(len(self.actors)) if self.nodes[j] == node]
        j = min(local or range(len(self.actors)), key=lambda k: (self.load[k], k))
        self.load[j] += 1
        return j

    def release(self, j: int | None) -> None:
        if j is not None:
            self.load[j] -= 1

    def actor(self, j: int | None) -> Any:
        return None if j is None else self.actors[j]


@dataclass
class Assignment:
    """A shard worker and the actors its next shard uses (indices into each stage's pool)."""

    worker: Any
    node: str
    generator: int
    detector: int | None


class WorkerPool:
    """The shard workers: starting, idle or busy, and the lost ones still owed a replacement.

    A lost worker is replaced only once every generator and detector actor answers again: when a
    node dies its actors restart elsewhere, and replacement workers started first could take the
    CPUs a restarting generator needs, leaving shards waiting on a generator that never comes back.
    """

    def __init__(self, generators: StagePool, detectors: StagePool, cpus: float, size: int = 0) -> None:
        self.generators, self.detectors, self.cpus, self.size = generators, detectors, cpus, size
        self.starting: dict[Any, Any] = {}  # where() ref -> worker
        self.idle: list[tuple[Any, str]] = []  # (worker, node id)
        self.workers: list[Any] = []
        self.started = 0
        self.lost = 0  # workers that died under a shard (their node went away, or were killed)
        self.owed = 0  # lost workers not replaced yet
        self.probes: dict[Any, tuple[StagePool, int]] = {}  # where() ref -> (stage, actor), while replacements wait

    def add_worker(self, near: int | None) -> None:
        """Start one shard worker, softly pinned to generator `near`'s node (None: Ray places it)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts: dict[str, Any] = {"num_cpus": self.cpus, "max_restarts": 0, "max_concurrency": 2}
        if near is not None:
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(self.generators.nodes[near], soft=True)
        w = ray.remote(ShardWorker).options(**opts).remote()
        self.workers.append(w)
        self.starting[w.where.remote()] = w
        self.started += 1

    def started_one(self, ref: Any) -> None:
        """A worker's where() answered: it is idle on that node, or, if it could not start, lost."""
        import ray

        w = self.starting.pop(ref)
        try:
            self.idle.append((w, ray.get(ref)["node_id"]))
        except Exception as err:  # noqa: BLE001 - a worker that cannot start is replaced
            self.lose(w, err)

    def assign(self) -> Assignment:
        """An idle worker and the least-loaded generator and detector for its next shard."""
        w, node = self.idle.pop(0)
        g = self.generators.take(node)
        if g is None:
            raise RuntimeError("no generator actor to assign a shard to")
        return Assignment(w, node, g, self.detectors.take(node))

    def release(self, a: Assignment, worker_alive: bool = True) -> None:
        """The shard of `a` is over: its actors serve one shard fewer, its worker is idle again."""
        self.generators.release(a.generator)
        self.detectors.release(a.detector)
        if worker_alive:
            self.idle.append((a.worker, a.node))

    def lose(self, worker: Any, err: BaseException) -> None:
        """Drop a worker that died (its node went away, or it could not start); a new one follows
        once the model actors answer (see `replace`)."""
        import ray

        log.warning("a shard worker was lost (%s); starting another once the model actors answer", short_error(err))
        self.lost += 1
        self.owed += 1
        try:
            ray.kill(worker)
        except Exception:  # noqa: BLE001 - it is usually gone already
            pass
        if self.size and self.started >= 4 * self.size and not self.idle and not self.starting:
            raise RuntimeError(
                f"{self.started} shard workers started and none stays up; last error: {short_error(err)}"
            )

    def replace(self) -> None:
        """Start the owed workers once every generator and detector has answered where it now is."""
        import ray

        if not self.owed:
            return
        if not self.probes:
            self.probes = {
                a.where.remote(): (stage, j) for stage in (self.generators, self.detectors) for j, a in enumerate(stage.actors)
            }
        ready, _ = ray.wait(list(self.probes), num_returns=len(self.probes), timeout=0)
        if len(ready) < len(self.probes):
            return
        for ref, (stage, j) in self.probes.items():
            try:
                stage.nodes[j] = ray.get(ref)["node_id"]
            except Exception as err:  # noqa: BLE001 - out of restarts: its shards fail and are recorded
                log.warning("model actor %d does not answer (%s)", j, short_error(err))
        self.probes = {}
        for k in range(self.owed):
            self.add_worker(near=k % len(self.generators))
        self.owed = 0
