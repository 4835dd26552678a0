"""The Ray job graph: actors own models; small idempotent shard tasks drive candidates through them.

Generator and detector actors load their models once. Each shard task runs on a shard worker, an
actor that lives for the whole build (one per shard in flight, placed beside the generators), and
uses the least-loaded generator and detector on its own node.

`factory build` calls `ray.init()`: inside `ray job submit` or with RAY_ADDRESS set it joins that
cluster, otherwise it starts an embedded local Ray. The driver keeps O(shards in flight) state:
it never sees a sample, only each shard's stats.
"""

from __future__ import annotations

import logging
import os
import platform
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from .config import ConfigError, FactoryConfig, config_diff
from .layout import Layout
from .manifest import clean_uncommitted, clear_failure, record_failure, scan
from .plan import Plan
from .progress import BuildProgress
from .sampler import QuotaExhaustedError

log = logging.getLogger(__name__)


class ModelLoadError(ConfigError):
    """An actor could not load a configured model (missing, corrupt or mismatched file)."""


def _actor_cause(err: BaseException) -> str:
    """The original exception line out of a Ray actor-death error (its text embeds the traceback)."""
    text = str(err)
    for line in reversed(text.splitlines()):
        line = line.strip()
        if "Error:" in line and not line.startswith(("ray.", "File ")):
            return line
    return text.splitlines()[0] if text else type(err).__name__


class BuildConfigMismatch(ConfigError):
    """OUT holds a build with another config; resuming it under this one would mix two corpora."""


@dataclass
class BuildSummary:
    out: str
    build_id: str
    target: int
    num_shards: int
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

    @property
    def ok(self) -> bool:
        return not self.failed and self.committed == self.num_shards


@dataclass
class ActorBusy:
    """How busy one generator or detector actor was while shards remained.

    The generators hold the costly accelerators (GPUs on a cluster), the detectors a share of
    one: a generator fraction well below 1 while shards remained means it sat idle waiting on the
    shard tasks' other work (too few shards in flight, slow expand/detect/write), so adding
    generators would not speed the build up; a detector near 1 says detection is the bottleneck.
    `fraction` is busy_s over the driver's shard window (first shard submitted to last shard
    finished), so it is comparable across actors; an actor that restarted counts its last life only.
    """

    stage: str  # "generator" or "detector"
    actor: int
    node_ip: str
    calls: int
    images: int
    busy_s: float  # seconds inside generate() / detect()
    active_s: float  # this actor's own window: start of its first call to end of its last
    fraction: float
    gpu_ids: list[str] = field(default_factory=list)  # the GPUs Ray gave the actor (none on CPU)

    def describe(self) -> str:
        call = "generate" if self.stage == "generator" else "detect"
        return (
            f"{self.stage} {self.actor} busy {self.fraction:.3f} ({self.busy_s:.1f} s in {call}, "
            f"{self.calls} calls, {self.images} images, active {self.active_s:.1f} s, node {self.node_ip}"
            + (f", GPU {','.join(self.gpu_ids)})" if self.gpu_ids else ")")
        )


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("mifa-factory", "ray", "numpy", "pillow", "webdataset", "pyarrow", "pydantic", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def prepare_output(cfg: FactoryConfig, out: str, new_build: bool = False) -> tuple[Layout, dict[str, Any]]:
    """Create OUT or check that it holds this very build; returns its build.json."""
    layout = Layout(out)
    models = _model_hashes(cfg)  # a missing model file fails here, before OUT is touched
    layout.makedirs()
    build_id = cfg.identity_hash()
    old = _read_record(layout, new_build)
    if old is not None:
        old_identity = old["identity"]
        same_config = old.get("build_id") == build_id and old_identity == cfg.identity_dict()
        if same_config and old.get("models", {}) == models:
            return layout, old
        if same_config and not new_build:
            raise BuildConfigMismatch(
                f"{out} holds build {build_id} made with other model files (generator checkpoint or detectors) "
                f"(build.json: {old.get('models')}; now: {models}); refusing to mix corpora filtered by "
                "different models. Restore those files, or start over with `factory build --out "
                f"{out} --new-build` and this config"
            )
        if not new_build:
            raise BuildConfigMismatch(
                f"{out} holds build {old.get('build_id')} made with another config; refusing to mix corpora. "
                f"Use the same config (or `factory resume {out}`), or pass --new-build to delete it and start "
                f"over.\n{config_diff(old_identity, cfg.identity_dict())}"
            )
        log.warning("--new-build: deleting build %s in %s", old.get("build_id"), out)
        _delete_build(layout)
    plan = Plan(cfg)
    record = {
        "build_id": build_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "identity": cfg.identity_dict(),
        "config": cfg.model_dump(mode="json"),
        "models": models,
        "plan": {"target": plan.target, "shard_size": plan.shard_size, "num_shards": plan.num_shards},
        "versions": versions(),
    }
    layout.write_json_atomic(layout.build_json, record)
    return layout, record


def _read_record(layout: Layout, new_build: bool) -> dict[str, Any] | None:
    """OUT's build.json, or None when there is none. An unreadable one is an error, unless --new-build
    is deleting OUT anyway."""
    if not layout.fs.exists(layout.build_json):
        return None
    try:
        old = layout.read_json(layout.build_json)
        if not isinstance(old, dict) or "identity" not in old:
            raise KeyError("identity")
        return old
    except (ValueError, KeyError, OSError) as err:
        if not new_build:
            raise ConfigError(
                f"{layout.build_json} is unreadable ({type(err).__name__}: {err}); move OUT aside, or pass "
                "--new-build to delete it and start over"
            ) from None
        log.warning("--new-build: deleting %s, whose build.json is unreadable (%s)", layout.out, err)
        _delete_build(layout)
        return None


def _delete_build(layout: Layout) -> None:
    """--new-build: remove every shard, rejected sample, failure record and the build record."""
    for d in (layout.shards_dir, layout.rejected_dir, layout.failed_dir):
        if layout.fs.exists(d):
            layout.fs.rm(d, recursive=True)
    layout.fs.rm(layout.build_json)
    layout.makedirs()


def _model_hashes(cfg: FactoryConfig) -> dict[str, str]:
    """sha256 of the MAUGen checkpoint and of every model file the filters use (checked again on resume)."""
    hashes: dict[str, str] = {}
    if cfg.generator == "maugen":
        from pipelines.maugen.builtin import checkpoint_hash, resolve_checkpoint

        hashes[f"maugen:{cfg.maugen.checkpoint}"] = checkpoint_hash(resolve_checkpoint(cfg.maugen.checkpoint))
    if cfg.detect.enabled:
        from detectors.panel import model_hashes

        refs = list(cfg.detect.au_detectors) + ([cfg.detect.realism] if cfg.detect.realism else [])
        hashes |= model_hashes(refs)
    return hashes


def _detectors_ask(cfg: FactoryConfig) -> tuple[float, float]:
    """(CPUs, GPUs) the detector actors hold for the whole build (none with detect off)."""
    rt = cfg.runtime
    if not cfg.detect.enabled:
        return 0.0, 0.0
    return rt.num_detectors * rt.detector_cpus, rt.num_detectors * rt.detector_gpus


def generator_count(cfg: FactoryConfig, resources: dict[str, float]) -> int:
    """runtime.num_generators, or for `auto` as many generators as the cluster holds: on GPUs, its
    whole GPUs left beside the detectors' shares; on CPUs, its CPUs left beside the detectors, with
    room for each generator's 2 shard workers."""
    rt = cfg.runtime
    if rt.num_generators != "auto":
        return rt.num_generators
    det_cpus, det_gpus = _detectors_ask(cfg)
    if rt.generator_gpus > 0:
        kind, left, per = "GPU", resources.get("GPU", 0.0) - det_gpus, rt.generator_gpus
    else:
        kind, left, per = "CPU", resources.get("CPU", 0.0) - det_cpus, rt.generator_cpus + 2 * rt.shard_worker_cpus
    n = int(left / per + 1e-9)
    if n < 1:
        raise ConfigError(
            f"config error: runtime.num_generators=auto: the Ray cluster has {resources.get(kind, 0.0):g} {kind}s, "
            f"{max(left, 0.0):g} left beside the detectors, and a generator needs {per:g}; add {kind}s or lower "
            f"runtime.generator_{kind.lower()}s"
        )
    return n


def _check_resources(cfg: FactoryConfig, num_generators: int, resources: dict[str, float]) -> None:
    """Actors hold their CPUs and GPUs for the whole build: ones that do not fit wait forever, and
    actors that leave no CPU for a shard worker run nothing."""
    rt = cfg.runtime
    det_cpus, det_gpus = _detectors_ask(cfg)
    total = float(resources.get("CPU", 0.0))
    actors = num_generators * rt.generator_cpus + det_cpus
    gpus = num_generators * rt.generator_gpus + det_gpus
    if actors + rt.shard_worker_cpus > total + 1e-9:
        raise ConfigError(
            f"config error: runtime: the actors reserve {actors:g} CPUs and a shard worker {rt.shard_worker_cpus:g}, "
            f"but the Ray cluster has {total:g}; lower runtime.generator_cpus / runtime.detector_cpus / "
            "runtime.num_generators / runtime.num_detectors, or add CPUs"
        )
    have = float(resources.get("GPU", 0.0))
    if gpus > have + 1e-9:
        raise ConfigError(
            f"config error: runtime: {num_generators} generators x {rt.generator_gpus:g} GPU and the detectors' "
            f"shares need {gpus:g} GPUs, but the Ray cluster has {have:g}; lower runtime.num_generators (or set it "
            "to auto) / runtime.generator_gpus / runtime.detector_gpus, or add GPU nodes"
        )


def _init_ray(cfg: FactoryConfig) -> bool:
    """Join RAY_ADDRESS / the job's cluster, or start an embedded local Ray. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    env_vars = {k: v for k, v in os.environ.items() if k in ("MIFA_FAULTS", "MIFA_INJECT")}
    if env_vars:
        kwargs["runtime_env"] = {"env_vars": env_vars}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs.update(
            address="local",  # never join a cluster that some earlier `ray start` left on this machine
            num_cpus=cfg.runtime.num_cpus,
            object_store_memory=cfg.runtime.object_store_mb * 1024 * 1024,
            include_dashboard=False,
        )
        log.info("starting an embedded local Ray (set RAY_ADDRESS or use `ray job submit` for a cluster)")
    else:
        log.info("joining the Ray cluster at %s", os.environ["RAY_ADDRESS"])
    try:
        ray.init(**kwargs)
    except ConnectionError as err:
        raise ConnectionError(
            f"{err}. Is the cluster up, and does this client hold its token? With token auth (Ray's default) set "
            "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH; for a cluster started with "
            "RAY_AUTH_MODE=disabled, set the same here"
        ) from err
    return True


def _client_auth_mode() -> None:
    """Ray 2.60 clusters use token auth by default, but a client with RAY_AUTH_MODE unset sends no
    token. When a token is at hand (env or ~/.ray/auth_token) and the mode is unset, use it."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        os.environ["RAY_AUTH_MODE"] = "token"
        log.info("RAY_AUTH_MODE unset and a Ray token is available: connecting with token auth")


class _BusyMeter:
    """Counts an actor's calls, images and seconds inside them, for the driver's busy fraction."""

    def __init__(self) -> None:
        self.calls = 0
        self.images = 0
        self.busy_s = 0.0
        self.first_start: float | None = None
        self.last_end: float | None = None

    def _metered(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        start, t = time.time(), time.perf_counter()
        try:
            return fn(arg)
        finally:
            self.busy_s += time.perf_counter() - t
            self.calls += 1
            self.images += len(arg)
            if self.first_start is None:
                self.first_start = start
            self.last_end = time.time()

    def where(self) -> dict[str, str]:
        """This actor's node, so that shard workers there use it first."""
        return _node()

    def busy(self) -> dict[str, Any]:
        """Time spent inside the metered calls and the window of the calls."""
        import ray

        active = self.last_end - self.first_start if self.first_start is not None and self.last_end else 0.0
        return {
            "node_ip": ray.util.get_node_ip_address(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "calls": self.calls,
            "images": self.images,
            "busy_s": self.busy_s,
            "active_s": active,
        }


class GeneratorActor(_BusyMeter):
    """Owns one generator (model loaded once) and serves batches to shard tasks."""

    def __init__(self, cfg_dict: dict[str, Any]):
        from .generators import make_generator

        super().__init__()
        self.generator = make_generator(FactoryConfig.model_validate(cfg_dict))

    def info(self) -> dict[str, str]:
        return {"name": self.generator.name, "version": self.generator.version}

    def generate(self, batch: Any) -> Any:
        return self._metered(self.generator.generate, batch)


class DetectorActor(_BusyMeter):
    """Owns the AU detectors and the realism discriminator (ONNX sessions loaded once)."""

    def __init__(self, cfg_dict: dict[str, Any]):
        from detectors.panel import DetectorPanel

        super().__init__()
        cfg = FactoryConfig.model_validate(cfg_dict)
        d = cfg.detect
        self.panel = DetectorPanel(
            d.au_detectors,
            d.min_agree,
            realism=d.realism,
            threads=cfg.runtime.detector_threads_used,
            occurrence_threshold=cfg.labels.occurrence_threshold,
            batch_size=d.batch_size,
        )

    def describe(self) -> dict[str, Any]:
        return self.panel.describe()

    def detect(self, images: Any) -> Any:
        return self._metered(self.panel.detect, images)


class ShardWorker:
    """Runs shard tasks, one at a time, in a process that lives for the whole build.

    Why an actor and not a Ray task per shard: Ray keeps only about `num_cpus` idle workers per
    node and kills an extra idle one after a second, so tasks spread over several nodes kept
    landing on fresh worker processes, each importing torch and the factory again (measured:
    12 short-lived workers and ~2x the CPU per sample on 2 hosts, bench/bench_cluster_scaling.py).
    A shard task is still small and idempotent: the driver re-submits a failed one, here or on
    another worker, with attempt + 1. The actor runs two threads (max_concurrency=2) so that
    `live()` answers while `run()` works: a MAUGen shard takes minutes to fill.
    """

    def __init__(self) -> None:
        self._live = (0, 0)

    def live(self) -> tuple[int, int]:
        """(accepted, candidates) of the shard running now, as of its last round."""
        return self._live

    def where(self) -> dict[str, str]:
        """This worker's node, which the driver uses to hand it node-local generators and detectors."""
        return _node()

    def run(
        self,
        cfg_dict: dict[str, Any],
        index: int,
        out: str,
        generator: Any,
        detector: Any,
        build_id: str,
        attempt: int,
        info: dict,
    ) -> dict[str, Any]:
        import ray

        from .shard import run_shard

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        cfg = FactoryConfig.model_validate(cfg_dict)
        self._live = (0, 0)

        def on_round(accepted: int, candidates: int) -> None:
            self._live = (accepted, candidates)

        return run_shard(
            cfg,
            index,
            out,
            generate=lambda batch: ray.get(generator.generate.remote(batch)),
            build_id=build_id,
            attempt=attempt,
            generator_info=info,
            detect=(lambda images: ray.get(detector.detect.remote(images))) if detector is not None else None,
            node={**_node(), "worker_id": ray.get_runtime_context().get_actor_id()},
            on_round=on_round,
        )


def _poll_live(in_flight: dict[Any, tuple[Any, ...]]) -> dict[int, tuple[int, int]]:
    """(accepted, candidates) so far of each shard in flight, asked of its worker. A worker that
    does not answer within a second is left out: if it died, the shard's own result says so."""
    import ray

    asked = {entry[2].live.remote(): entry[0] for entry in in_flight.values()}
    ready, _ = ray.wait(list(asked), num_returns=len(asked), timeout=1.0)
    live: dict[int, tuple[int, int]] = {}
    for ref in ready:
        try:
            accepted, candidates = ray.get(ref)
        except Exception:  # noqa: BLE001 - progress is best effort; the shard's result reports failures
            continue
        live[asked[ref]] = (int(accepted), int(candidates))
    return live


def _node() -> dict[str, str]:
    import ray

    return {"node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id()}


class _Pool:
    """Who runs where: the shard workers (starting, idle, busy) and how many shards each generator
    and detector actor is serving, so a shard gets the least-loaded actors on its worker's node.

    A lost worker is replaced only once every generator and detector actor answers again: when a
    node dies its actors restart elsewhere, and replacement workers started first could take the
    CPUs a restarting generator needs, leaving shards waiting on a generator that never comes back.
    """

    def __init__(
        self, generators: list[Any], detectors: list[Any], actor_node: list[str], cpus: float, size: int = 0
    ) -> None:
        self.generators, self.detectors, self.cpus, self.size = generators, detectors, cpus, size
        self.actor_node = actor_node  # node id of each generator, then of each detector
        self.load = [0] * len(self.actor_node)
        self.starting: dict[Any, Any] = {}  # where() ref -> worker
        self.idle: list[tuple[Any, str]] = []  # (worker, node id)
        self.started = 0
        self.lost = 0  # workers that died under a shard (their node went away, or were killed)
        self.owed = 0  # lost workers not replaced yet
        self.probes: dict[Any, int] = {}  # where() ref -> actor index, while replacements wait
        self.workers: list[Any] = []

    def add_worker(self, near: int | None) -> None:
        """Start one shard worker, softly pinned to generator `near`'s node (None: Ray places it)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts: dict[str, Any] = {"num_cpus": self.cpus, "max_restarts": 0, "max_concurrency": 2}
        if near is not None:
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(self.actor_node[near], soft=True)
        w = ray.remote(ShardWorker).options(**opts).remote()
        self.workers.append(w)
        self.starting[w.where.remote()] = w
        self.started += 1

    def lose(self, worker: Any, err: BaseException) -> None:
        """Drop a worker that died (its node went away, or it could not start); a new one follows
        once the model actors answer (see `replace`)."""
        import ray

        log.warning("a shard worker was lost (%s); starting another once the model actors answer", _short(err))
        self.lost += 1
        self.owed += 1
        try:
            ray.kill(worker)
        except Exception:  # noqa: BLE001 - it is usually gone already
            pass
        if self.size and self.started >= 4 * self.size and not self.idle and not self.starting:
            raise RuntimeError(f"{self.started} shard workers started and none stays up; last error: {_short(err)}")

    def replace(self) -> None:
        """Start the owed workers once every generator and detector has answered where it now is."""
        import ray

        if not self.owed:
            return
        actors = [*self.generators, *self.detectors]
        if not self.probes:
            self.probes = {a.where.remote(): j for j, a in enumerate(actors)}
        ready, _ = ray.wait(list(self.probes), num_returns=len(self.probes), timeout=0)
        if len(ready) < len(self.probes):
            return
        for ref, j in self.probes.items():
            try:
                self.actor_node[j] = ray.get(ref)["node_id"]
            except Exception as err:  # noqa: BLE001 - out of restarts: its shards fail and are recorded
                log.warning("model actor %d does not answer (%s)", j, _short(err))
        self.probes = {}
        for k in range(self.owed):
            self.add_worker(near=k % len(self.generators))
        self.owed = 0

    def pick(self, node: str, first: int, count: int) -> int | None:
        """Least-loaded actor of one stage (indices first..first+count), on `node` if one is there."""
        if count == 0:
            return None
        idx = range(first, first + count)
        local = [j for j in idx if self.actor_node[j] == node]
        return min(local or idx, key=lambda j: (self.load[j], j))

    def assign(self) -> tuple[Any, str, int, int | None]:
        """An idle worker and the generator and detector (indices into load) its next shard uses."""
        w, node = self.idle.pop(0)
        g = self.pick(node, 0, len(self.generators))
        d = self.pick(node, len(self.generators), len(self.detectors))
        assert g is not None
        self.load[g] += 1
        if d is not None:
            self.load[d] += 1
        return w, node, g, d

    def actor(self, j: int | None) -> Any:
        """The generator or detector actor at index `j` of `load` (None: no detector)."""
        if j is None:
            return None
        return self.generators[j] if j < len(self.generators) else self.detectors[j - len(self.generators)]

    def release(self, g: int, d: int | None) -> None:
        self.load[g] -= 1
        if d is not None:
            self.load[d] -= 1


def _worker_lost(err: BaseException) -> bool:
    """The shard worker process itself is gone (its node died or lost its link), as opposed to the
    shard raising inside it. A RayTaskError that wraps an actor error (the generator died under the
    shard) is an instance of that error too, so it is ruled out first."""
    import ray

    if isinstance(err, ray.exceptions.RayTaskError):
        return False
    return isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


def _deterministic(err: BaseException) -> bool:
    """A failure that a re-run replays exactly: a shard that ran out of its candidate budget draws
    the same candidates again, so retrying it would only spend the budget again."""
    return isinstance(_cause(err), QuotaExhaustedError)


def _error_record(name: str, index: int, err: BaseException, attempts: int) -> dict[str, Any]:
    cause = _cause(err)
    return {
        "name": name,
        "index": index,
        "error": f"{type(cause).__name__}: {cause}".splitlines()[0][:2000],
        "type": type(cause).__name__,
        "traceback": "".join(traceback.format_exception(err))[-8000:],
        "attempts": attempts,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run_build(cfg: FactoryConfig, out: str, new_build: bool = False) -> BuildSummary:
    """Build or resume OUT until every shard is committed or has run out of retries."""
    if os.environ.get("RAY_ADDRESS"):
        _client_auth_mode()  # before ray is imported: it reads the mode once
    import ray

    t0 = time.time()
    layout, record = prepare_output(cfg, out, new_build=new_build)
    build_id = record["build_id"]
    plan = Plan(cfg)
    state = scan(layout, build_id)
    clean_uncommitted(layout, state.committed)
    summary = BuildSummary(out, build_id, plan.target, plan.num_shards)
    summary.skipped = len(state.committed)
    summary.committed = len(state.committed)
    summary.accepted = sum(int(s.get("samples", 0)) for s in state.committed.values())
    pending = deque(i for i in range(plan.num_shards) if plan.shard_name(i) not in state.committed)
    if not pending:
        log.info("%s: all %d shards already committed", out, plan.num_shards)
        summary.seconds = time.time() - t0
        return summary
    log.info(
        "build %s: %d shards, %d committed, %d to run -> %s",
        build_id,
        plan.num_shards,
        len(state.committed),
        len(pending),
        out,
    )

    started = _init_ray(cfg)
    try:
        rt = cfg.runtime
        resources = ray.cluster_resources()
        num_generators = generator_count(cfg, resources)
        _check_resources(cfg, num_generators, resources)
        cfg_dict = cfg.model_dump(mode="json")
        actor_cls = ray.remote(GeneratorActor).options(
            num_cpus=rt.generator_cpus, num_gpus=rt.generator_gpus, max_restarts=3, max_task_retries=2
        )
        actors = [actor_cls.remote(cfg_dict) for _ in range(num_generators)]
        detectors: list[Any] = []
        if cfg.detect.enabled:
            det_cls = ray.remote(DetectorActor).options(
                num_cpus=rt.detector_cpus, num_gpus=rt.detector_gpus, max_restarts=3, max_task_retries=2
            )
            detectors = [det_cls.remote(cfg_dict) for _ in range(rt.num_detectors)]
            try:
                ray.get([d.describe.remote() for d in detectors])
            except ray.exceptions.RayActorError as err:
                raise ModelLoadError(f"the detector actors could not load their models: {_actor_cause(err)}") from None
        try:
            info = ray.get([a.info.remote() for a in actors])[0]
        except ray.exceptions.RayActorError as err:
            raise ModelLoadError(f"the generator actors could not load their model: {_actor_cause(err)}") from None
        cfg_ref = ray.put(cfg_dict)
        max_in_flight = rt.max_shards_in_flight or 2 * num_generators
        # One shard worker per shard in flight, spread over the generators' nodes. No Ray-level
        # retries: a shard whose worker or node dies comes back here as an error and is re-submitted
        # with attempt + 1, so its stats record every attempt it took.
        nodes = ray.get([a.where.remote() for a in [*actors, *detectors]])
        pool = _Pool(actors, detectors, [n["node_id"] for n in nodes], rt.shard_worker_cpus, max_in_flight)
        for k in range(max_in_flight):
            pool.add_worker(near=k % len(actors))
        in_flight: dict[Any, tuple[int, int, Any, str, int, int | None]] = {}
        attempts: dict[int, int] = {}
        progress = BuildProgress(plan.target, plan.num_shards, enabled=rt.progress)
        progress.start(summary.accepted, summary.committed)
        t_first: float | None = None
        committed = set(state.committed)
        try:
            while pending or in_flight:
                while pending and pool.idle:
                    if t_first is None:
                        t_first = time.time()
                    i = pending.popleft()
                    attempts[i] = attempts.get(i, 0) + 1
                    w, node, g, d = pool.assign()
                    ref = w.run.remote(cfg_ref, i, out, pool.actor(g), pool.actor(d), build_id, attempts[i], info)
                    in_flight[ref] = (i, attempts[i], w, node, g, d)
                waiting = [*in_flight, *pool.starting]
                if waiting:
                    ready, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
                else:  # no shard running, no worker starting: lost workers wait on the model actors
                    ready = []
                    time.sleep(1.0)
                for ref in ready:
                    if ref in pool.starting:
                        w = pool.starting.pop(ref)
                        try:
                            pool.idle.append((w, ray.get(ref)["node_id"]))
                        except Exception as err:  # noqa: BLE001 - a worker that cannot start is replaced
                            pool.lose(w, err)
                        continue
                    i, attempt, w, node, g, d = in_flight.pop(ref)
                    pool.release(g, d)
                    name = plan.shard_name(i)
                    try:
                        stats = ray.get(ref)
                    except Exception as err:  # noqa: BLE001 - any shard error is retried, then recorded
                        if _worker_lost(err):
                            pool.lose(w, err)
                        else:
                            pool.idle.append((w, node))
                        if attempt <= cfg.build.shard_retries and not _deterministic(err):
                            log.warning("shard %s attempt %d failed (%s); retrying", name, attempt, _short(err))
                            pending.appendleft(i)
                            progress.shard_retried(i)
                        else:
                            rec = _error_record(name, i, err, attempt)
                            record_failure(layout, name, rec)
                            summary.failed[name] = rec["error"]
                            log.error("shard %s failed after %d attempts: %s", name, attempt, rec["error"])
                            progress.shard_failed(i)
                        continue
                    pool.idle.append((w, node))
                    committed.add(name)
                    clear_failure(layout, name)
                    summary.committed += 1
                    summary.accepted += int(stats["samples"])
                    summary.candidates += int(stats["candidates"])
                    for reason, n in stats["rejected"].items():
                        summary.rejected[reason] = summary.rejected.get(reason, 0) + int(n)
                    progress.shard_done(int(stats["samples"]), int(stats["candidates"]), summary.rejected, i)
                    del attempts[i]
                pool.replace()
                if in_flight and progress.live_due():
                    progress.live(_poll_live(in_flight))
                progress.tick()
            if pool.lost:
                # A worker killed mid-shard leaves that attempt's temporary files; the shard was
                # redone elsewhere, so they are garbage (a resume would sweep them too).
                clean_uncommitted(layout, dict.fromkeys(committed))
            summary.shards_seconds = time.time() - t_first if t_first is not None else 0.0
            summary.generators = _actor_busy("generator", actors, summary.shards_seconds)
            summary.detectors = _actor_busy("detector", detectors, summary.shards_seconds)
            progress.actors_busy([b.describe() for b in [*summary.generators, *summary.detectors]])
        finally:
            progress.stop()
            for a in [*pool.workers, *actors, *detectors]:
                try:
                    ray.kill(a)
                except Exception as err:  # noqa: BLE001 - an actor whose node is gone cannot be killed
                    log.debug("could not kill %s: %s", a, _short(err))
    finally:
        if started:
            ray.shutdown()
    summary.seconds = time.time() - t0
    return summary


def _actor_busy(stage: str, actors: list[Any], window_s: float, timeout_s: float = 10.0) -> list[ActorBusy]:
    """Ask every actor of a stage how long it spent in its calls; an actor that is gone or does
    not answer within timeout_s (its node died or lost its link) is left out, not waited on."""
    import ray

    if not actors:
        return []
    refs = {a.busy.remote(): i for i, a in enumerate(actors)}
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    for ref in late:
        log.warning("%s %d: no busy accounting (no answer within %g s)", stage, refs[ref], timeout_s)
    out: list[ActorBusy] = []
    for ref in ready:
        try:
            b = ray.get(ref)
        except Exception as err:  # noqa: BLE001 - accounting only: a dead actor must not fail the build
            log.warning("%s %d: no busy accounting (%s)", stage, refs[ref], _short(err))
            continue
        frac = b["busy_s"] / window_s if window_s > 0 else 0.0
        out.append(
            ActorBusy(
                stage, refs[ref], b["node_ip"], b["calls"], b["images"], b["busy_s"], b["active_s"], frac, b["gpu_ids"]
            )
        )
    return sorted(out, key=lambda g: g.actor)


def _cause(err: BaseException) -> BaseException:
    """The exception a shard raised, out of the RayTaskError that carries it to the driver."""
    return getattr(err, "cause", None) or err


def _short(err: BaseException) -> str:
    cause = _cause(err)
    return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
