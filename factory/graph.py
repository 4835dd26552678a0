"""The Ray job graph's driver: `run_build` hands shards to shard workers until each is committed or failed.

Actors own models and load them once (factory/actors.py); each shard runs on a shard worker,
an actor that lives for the whole build, with the least-loaded generator and detector on its
own node (factory/pool.py). `factory build` calls `ray.init()`: inside `ray job submit` or with
RAY_ADDRESS set it joins that cluster, otherwise it starts an embedded local Ray
(factory/cluster.py). The driver keeps O(shards in flight) state: it never sees a sample, only
each shard's stats. docs/architecture.md follows a build through these files.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .actors import ActorBusy, actor_busy, error_cause, short_error, start_model_actors
from .cluster import client_auth_mode, init_ray
from .config import ConfigError, FactoryConfig
from .fallbacks import FallbackCount, endpoint, fallback_stop, shards_count
from .layout import Layout
from .manifest import clean_uncommitted, clear_failure, record_failure, scan
from .plan import Plan
from .pool import Assignment, StagePool, WorkerPool
from .progress import BuildProgress
from .record import prepare_output
from .sampler import QuotaExhaustedError
from .sizing import Sizing, check_resources, size_runtime
from .stops import BuildStopped, fatal_os_error, storage_stop

log = logging.getLogger(__name__)


@dataclass
class BuildSummary:
    out: str
    build_id: str
    target: int
    num_shards: int
    shard_prefix: str = "mifa"
    committed: int = 0
    accepted: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    candidates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    #: From the first shard submitted to the last one finished (0 when no shard ran).
    shards_seconds: float = 0.0
    generators: list[ActorBusy] = field(default_factory=list)
    detectors: list[ActorBusy] = field(default_factory=list)
    #: The actors this run started and what each reserved (None when no shard was left to run).
    sizing: Sizing | None = None
    #: The driver process over the shard window: CPU seconds (all its threads, Ray's own included),
    #: and its resident memory in MiB when the first shard went out and when the last came back.
    driver_cpu_s: float = 0.0
    driver_rss_mb: tuple[float, float] = (0.0, 0.0)
    #: Prompts of every committed shard that fell back to the grammar; `llm` names the endpoint
    #: (None for the grammar backend, which has no fallback).
    prompts: FallbackCount = field(default_factory=FallbackCount)
    llm: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and self.committed == self.num_shards


@dataclass
class InFlight:
    """A shard running on a shard worker: which shard, which attempt, and who runs it."""

    index: int
    attempt: int
    slot: Assignment


def run_build(cfg: FactoryConfig, out: str, new_build: bool = False) -> BuildSummary:
    """Build or resume OUT until every shard is committed or has run out of retries."""
    if os.environ.get("RAY_ADDRESS"):
        client_auth_mode()  # before ray is imported: it reads the mode once
    t0 = time.time()
    _preflight_expander(cfg)
    layout = Layout(out)
    plan = Plan(cfg)
    try:
        summary = _build(cfg, out, new_build, plan)
    except BuildStopped as stop:
        _count_committed(stop, layout, cfg.identity_hash(), plan.num_shards)
        raise
    except OSError as err:  # the driver's own writes: build.json, cleaning, failed/ records
        fatal = fatal_os_error(err)
        if fatal is None:
            raise
        stop = storage_stop(fatal, layout)
        _count_committed(stop, layout, cfg.identity_hash(), plan.num_shards)
        raise stop from None
    summary.seconds = time.time() - t0
    return summary


def _build(cfg: FactoryConfig, out: str, new_build: bool, plan: Plan) -> BuildSummary:
    """Prepare OUT, then run its pending shards on Ray (started here unless one is already running)."""
    import ray

    layout, record = prepare_output(cfg, out, new_build=new_build)
    build_id = record["build_id"]
    state = scan(layout, build_id)
    clean_uncommitted(layout, state.committed)
    summary = BuildSummary(out, build_id, plan.target, plan.num_shards, cfg.build.shard_prefix)
    summary.skipped = summary.committed = len(state.committed)
    summary.accepted = sum(int(s.get("samples", 0)) for s in state.committed.values())
    summary.prompts, summary.llm = shards_count(list(state.committed.values())), endpoint(cfg)
    pending = deque(i for i in range(plan.num_shards) if plan.shard_name(i) not in state.committed)
    if not pending:
        log.info("%s: all %d shards already committed", out, plan.num_shards)
        return summary
    log.info(
        "build %s: %d shards, %d committed, %d to run -> %s",
        build_id,
        plan.num_shards,
        len(state.committed),
        len(pending),
        out,
    )
    started = init_ray(cfg)
    try:
        _run_on_ray(cfg, layout, plan, summary, pending, set(state.committed), set(state.failed))
    finally:
        if started:
            ray.shutdown()
    return summary


def _count_committed(stop: BuildStopped, layout: Layout, build_id: str, num_shards: int) -> None:
    """Put the shards committed on disk into the stop's line. Read after every writer has stopped,
    so shards that committed while the stop was on its way count too."""
    try:
        stop.committed = len(scan(layout, build_id).committed)
    except OSError as err:
        log.warning("could not count the committed shards in %s: %s", layout.out, err)
        return
    stop.num_shards = num_shards


def _preflight_expander(cfg: FactoryConfig) -> None:
    """An LLM expander's endpoint is asked once before anything is written: a wrong key, model or URL
    stops the build in one line (the grammar expander has nothing to check)."""
    if cfg.expand.backend != "llm":
        return
    from pipelines.prompts import make_expander
    from pipelines.prompts.llm import LLMConfigError

    try:
        make_expander(cfg.expand).preflight()
    except LLMConfigError as err:
        raise ConfigError(f"config error: {err}") from None


def _run_on_ray(
    cfg: FactoryConfig,
    layout: Layout,
    plan: Plan,
    summary: BuildSummary,
    pending: deque[int],
    committed: set[str],
    failed: set[str],
) -> None:
    """Start the model actors and the shard workers, run the pending shards, then stop every actor.
    `failed`: the shards with a failure record in OUT/failed/ (a commit removes its record)."""
    import ray

    resources = ray.cluster_resources()
    sizing = size_runtime(cfg, resources)
    check_resources(cfg, sizing, resources)
    log.info("on %g CPUs, %g GPUs: %s", resources.get("CPU", 0.0), resources.get("GPU", 0.0), sizing.describe())
    summary.sizing = sizing
    generators, detectors, info = start_model_actors(cfg, sizing)
    # One shard worker per shard in flight, spread over the generators' nodes. No Ray-level
    # retries: a shard whose worker or node dies comes back here as an error and is re-submitted
    # with attempt + 1, so its stats record every attempt it took.
    nodes = [n["node_id"] for n in ray.get([a.where.remote() for a in [*generators, *detectors]])]
    n_gen = sizing.generators
    pool = WorkerPool(
        StagePool(generators, nodes[:n_gen]),
        StagePool(detectors, nodes[n_gen:]),
        sizing.shard_worker_cpus,
        sizing.shard_workers,
    )
    for k in range(sizing.shard_workers):
        pool.add_worker(near=k % n_gen)
    cfg_ref = ray.put(cfg.model_dump(mode="json"))
    loop = _Scheduler(cfg, layout, plan, summary, pool, cfg_ref, info, pending, committed, failed)
    try:
        loop.run()
        summary.shards_seconds = time.time() - loop.t_first if loop.t_first is not None else 0.0
        summary.driver_cpu_s = time.process_time() - loop.cpu_first if loop.t_first is not None else 0.0
        summary.driver_rss_mb = (loop.rss_first, _rss_mb())
        log.info(
            "driver: %.2f CPU s over the %.1f s shard window, resident memory %.0f -> %.0f MiB",
            summary.driver_cpu_s,
            summary.shards_seconds,
            *summary.driver_rss_mb,
        )
        summary.generators = actor_busy("generator", generators, summary.shards_seconds)
        summary.detectors = actor_busy("detector", detectors, summary.shards_seconds)
        loop.progress.actors_busy([b.describe() for b in [*summary.generators, *summary.detectors]])
    finally:
        loop.progress.stop()
        for a in [*pool.workers, *generators, *detectors]:
            try:
                ray.kill(a)
            except Exception as err:  # noqa: BLE001 - an actor whose node is gone cannot be killed
                log.debug("could not kill %s: %s", a, short_error(err))


class _Scheduler:
    """The driver's loop: pending shards go to idle workers; each result is committed, retried or recorded."""

    def __init__(
        self,
        cfg: FactoryConfig,
        layout: Layout,
        plan: Plan,
        summary: BuildSummary,
        pool: WorkerPool,
        cfg_ref: Any,
        info: dict[str, str],
        pending: deque[int],
        committed: set[str],
        failed: set[str],
    ) -> None:
        self.cfg, self.layout, self.plan, self.summary, self.pool = cfg, layout, plan, summary, pool
        self.cfg_ref, self.info, self.pending, self.committed = cfg_ref, info, pending, committed
        # shards with a record in OUT/failed/: only their commits touch the store for it (on S3 a
        # look for a record that is not there is two requests, in the driver's loop, per shard)
        self.failed_records = failed
        self.in_flight: dict[Any, InFlight] = {}
        self.attempts: dict[int, int] = {}
        self.progress = BuildProgress(
            plan.target, plan.num_shards, enabled=cfg.runtime.progress, trace=cfg.runtime.progress_trace
        )
        self.t_first: float | None = None
        self.cpu_first, self.rss_first = 0.0, 0.0  # the driver's CPU seconds and memory at t_first
        # prompts of this run that fell back: committed shards, and the shards in flight so far
        self.run_prompts = FallbackCount()
        self.live_prompts: dict[int, FallbackCount] = {}

    def run(self) -> None:
        import ray

        self.progress.start(self.summary.accepted, self.summary.committed)
        while self.pending or self.in_flight:
            self._submit()
            waiting = [*self.in_flight, *self.pool.starting]
            if waiting:
                ready, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
            else:  # no shard running, no worker starting: lost workers wait on the model actors
                ready = []
                time.sleep(1.0)
            for ref in ready:
                if ref in self.pool.starting:
                    self.pool.started_one(ref)
                else:
                    self._finished(ref)
            self.pool.replace()
            if self.in_flight and self.progress.live_due():
                live = _poll_live(self.in_flight)
                self.progress.live({i: (a, c) for i, (a, c, _) in live.items()})
                self.live_prompts.update({i: FallbackCount().add(e) for i, (_, _, e) in live.items()})
                self._check_fallbacks()
            self.progress.tick()
        if self.pool.lost:
            # A worker killed mid-shard leaves that attempt's temporary files; the shard was
            # redone elsewhere, so they are garbage (a resume would sweep them too).
            clean_uncommitted(self.layout, dict.fromkeys(self.committed))

    def _submit(self) -> None:
        while self.pending and self.pool.idle:
            if self.t_first is None:
                self.t_first, self.cpu_first, self.rss_first = time.time(), time.process_time(), _rss_mb()
            i = self.pending.popleft()
            self.attempts[i] = self.attempts.get(i, 0) + 1
            a = self.pool.assign()
            ref = a.worker.run.remote(
                self.cfg_ref,
                i,
                self.layout.out,
                self.pool.generators.actor(a.generator),
                self.pool.detectors.actor(a.detector),
                self.summary.build_id,
                self.attempts[i],
                self.info,
                time.time(),
            )
            self.in_flight[ref] = InFlight(i, self.attempts[i], a)

    def _finished(self, ref: Any) -> None:
        import ray

        job = self.in_flight.pop(ref)
        try:
            stats = ray.get(ref)
        except Exception as err:  # noqa: BLE001 - any shard error is retried, then recorded
            lost = worker_lost(err)
            if lost:
                self.pool.lose(job.slot.worker, err)
            self.pool.release(job.slot, worker_alive=not lost)
            self._failed(job, err)
            return
        self.pool.release(job.slot)
        name, s = self.plan.shard_name(job.index), self.summary
        self.committed.add(name)
        try:
            if name in self.failed_records:
                clear_failure(self.layout, name)
                self.failed_records.discard(name)
        except OSError as err:  # a stale note; a storage fault that every shard meets stops the build
            fatal = fatal_os_error(err)
            if fatal is not None:
                raise storage_stop(fatal, self.layout) from None
            log.warning("could not remove the old failure record of shard %s: %s", name, short_error(err))
        s.committed += 1
        s.accepted += int(stats["samples"])
        s.candidates += int(stats["candidates"])
        for reason, n in stats["rejected"].items():
            s.rejected[reason] = s.rejected.get(reason, 0) + int(n)
        s.prompts.add(stats.get("expand") or {})
        self.run_prompts.add(stats.get("expand") or {})
        self.live_prompts.pop(job.index, None)
        self._check_fallbacks(stop=False)  # the progress line of this commit shows the share already
        self.progress.shard_done(int(stats["samples"]), int(stats["candidates"]), s.rejected, job.index)
        del self.attempts[job.index]
        self._check_fallbacks()

    def _check_fallbacks(self, stop: bool = True) -> None:
        """Show this run's share of prompts that fell back (LLM only) and, with `stop`, stop the build
        once it is past expand.max_fallback_share."""
        if self.summary.llm is None:
            return
        seen = sum(self.live_prompts.values(), self.run_prompts)
        self.progress.prompts(seen)
        if stop and seen.exceeds(self.cfg.expand.max_fallback_share):
            raise fallback_stop(self.cfg, seen, self.layout.out)

    def _failed(self, job: InFlight, err: BaseException) -> None:
        """Retry the shard, or record it in OUT/failed/; a storage fault stops the build instead."""
        name = self.plan.shard_name(job.index)
        self.live_prompts.pop(job.index, None)  # a retry asks its prompts again (from the cache)
        fatal = fatal_os_error(err)
        if fatal is not None:  # a full disk, a read-only OUT: every other shard would meet it too
            self._record(name, error_record(name, job.index, err, job.attempt), stopping=True)
            raise storage_stop(fatal, self.layout) from None
        if job.attempt <= self.cfg.build.shard_retries and not deterministic(err):
            log.warning("shard %s attempt %d failed (%s); retrying", name, job.attempt, short_error(err))
            self.pending.appendleft(job.index)
            self.progress.shard_retried(job.index)
            return
        rec = error_record(name, job.index, err, job.attempt)
        self._record(name, rec)
        self.summary.failed[name] = rec["error"]
        log.error("shard %s failed after %d attempts: %s", name, job.attempt, rec["error"])
        self.progress.shard_failed(job.index)

    def _record(self, name: str, rec: dict[str, Any], stopping: bool = False) -> None:
        """Write OUT/failed/NAME.json. It is a note for `report` and the user, so a write that fails
        never takes the driver down: a storage fault stops the build (unless it is stopping already),
        anything else is logged and the build goes on."""
        self.failed_records.add(name)
        try:
            record_failure(self.layout, name, rec)
        except OSError as err:
            fatal = fatal_os_error(err)
            if fatal is not None and not stopping:
                raise storage_stop(fatal, self.layout) from None
            log.warning("could not write the failure record of shard %s: %s", name, short_error(err))


def _rss_mb() -> float:
    """This process's resident memory in MiB (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _poll_live(in_flight: dict[Any, InFlight]) -> dict[int, tuple[int, int, dict[str, Any]]]:
    """(accepted, candidates, expander stats) so far of each shard in flight, asked of its worker. A
    worker that does not answer within a second is left out: if it died, the shard's own result says so."""
    import ray

    asked = {job.slot.worker.live.remote(): job.index for job in in_flight.values()}
    ready, _ = ray.wait(list(asked), num_returns=len(asked), timeout=1.0)
    live: dict[int, tuple[int, int, dict[str, Any]]] = {}
    for ref in ready:
        try:
            accepted, candidates, expand = ray.get(ref)
        except Exception:  # noqa: BLE001 - progress is best effort; the shard's result reports failures
            continue
        live[asked[ref]] = (int(accepted), int(candidates), dict(expand))
    return live


def worker_lost(err: BaseException) -> bool:
    """The shard worker process itself is gone (its node died or lost its link), as opposed to the
    shard raising inside it. A RayTaskError that wraps an actor error (the generator died under the
    shard) is an instance of that error too, so it is ruled out first."""
    import ray

    if isinstance(err, ray.exceptions.RayTaskError):
        return False
    return isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


def deterministic(err: BaseException) -> bool:
    """A failure that a re-run replays exactly: a shard that ran out of its candidate budget draws
    the same candidates again, so retrying it would only spend the budget again."""
    return isinstance(error_cause(err), QuotaExhaustedError)


def error_record(name: str, index: int, err: BaseException, attempts: int) -> dict[str, Any]:
    """OUT/failed/NAME.json: the shard's last error, its traceback and how many attempts it took."""
    cause = error_cause(err)
    return {
        "name": name,
        "index": index,
        "error": f"{type(cause).__name__}: {cause}".splitlines()[0][:2000],
        "type": type(cause).__name__,
        "traceback": "".join(traceback.format_exception(err))[-8000:],
        "attempts": attempts,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
