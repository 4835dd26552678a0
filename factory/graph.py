"""The Ray job graph: generator actors own models; small idempotent shard tasks drive candidates.

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

    def describe(self) -> str:
        call = "generate" if self.stage == "generator" else "detect"
        return (
            f"{self.stage} {self.actor} busy {self.fraction:.3f} ({self.busy_s:.1f} s in {call}, "
            f"{self.calls} calls, {self.images} images, active {self.active_s:.1f} s, node {self.node_ip})"
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
    if layout.fs.exists(layout.build_json):
        try:
            old = layout.read_json(layout.build_json)
            old_identity = old["identity"]
        except (ValueError, KeyError, OSError) as err:
            raise ConfigError(
                f"{layout.build_json} is unreadable ({err}); move OUT aside or pass --new-build to start over"
            ) from None
        same_config = old.get("build_id") == build_id and old_identity == cfg.identity_dict()
        if same_config and old.get("models", {}) == models:
            return layout, old
        if same_config and not new_build:
            raise BuildConfigMismatch(
                f"{out} holds build {build_id} made with other model files (generator checkpoint or detectors) "
                f"(build.json: {old.get('models')}; now: {models}); refusing to mix corpora filtered by "
                "different models. Restore those files, or pass --new-build to start over"
            )
        if not new_build:
            raise BuildConfigMismatch(
                f"{out} holds build {old.get('build_id')} made with another config; refusing to mix corpora. "
                f"Use the same config (or `factory resume {out}`), or pass --new-build to delete it and start "
                f"over.\n{config_diff(old_identity, cfg.identity_dict())}"
            )
        log.warning("--new-build: deleting build %s in %s", old.get("build_id"), out)
        for d in (layout.shards_dir, layout.rejected_dir, layout.failed_dir):
            if layout.fs.exists(d):
                layout.fs.rm(d, recursive=True)
        layout.fs.rm(layout.build_json)
        layout.makedirs()
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


def _check_resources(cfg: FactoryConfig) -> None:
    """Actors hold their CPUs for the whole build: if they leave none for a shard task, nothing runs."""
    import ray

    rt = cfg.runtime
    total = float(ray.cluster_resources().get("CPU", 0.0))
    actors = rt.num_generators * rt.generator_cpus
    if cfg.detect.enabled:
        actors += rt.num_detectors * rt.detector_cpus
    if actors + rt.shard_task_cpus > total + 1e-9:
        raise ConfigError(
            f"config error: runtime: the actors reserve {actors:g} CPUs and a shard task {rt.shard_task_cpus:g}, "
            f"but the Ray cluster has {total:g}; lower runtime.generator_cpus / runtime.detector_cpus / "
            "runtime.num_generators / runtime.num_detectors, or add CPUs"
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

    def busy(self) -> dict[str, Any]:
        """Time spent inside the metered calls and the window of the calls."""
        import ray

        active = self.last_end - self.first_start if self.first_start is not None and self.last_end else 0.0
        return {
            "node_ip": ray.util.get_node_ip_address(),
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
            threads=cfg.runtime.detector_threads,
            occurrence_threshold=cfg.labels.occurrence_threshold,
            batch_size=d.batch_size,
        )

    def describe(self) -> dict[str, Any]:
        return self.panel.describe()

    def detect(self, images: Any) -> Any:
        return self._metered(self.panel.detect, images)


def _shard_task(
    cfg_dict: dict[str, Any],
    index: int,
    out: str,
    actor: Any,
    detector: Any,
    build_id: str,
    attempt: int,
    info: dict,
):
    import ray

    from .shard import run_shard

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = FactoryConfig.model_validate(cfg_dict)
    return run_shard(
        cfg,
        index,
        out,
        generate=lambda batch: ray.get(actor.generate.remote(batch)),
        build_id=build_id,
        attempt=attempt,
        generator_info=info,
        detect=(lambda images: ray.get(detector.detect.remote(images))) if detector is not None else None,
        node={"node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id()},
    )


def _error_record(name: str, index: int, err: BaseException, attempts: int) -> dict[str, Any]:
    cause = getattr(err, "cause", None) or err
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
        _check_resources(cfg)
        cfg_dict = cfg.model_dump(mode="json")
        actor_cls = ray.remote(GeneratorActor).options(
            num_cpus=rt.generator_cpus, num_gpus=rt.generator_gpus, max_restarts=3, max_task_retries=2
        )
        actors = [actor_cls.remote(cfg_dict) for _ in range(rt.num_generators)]
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
        info = ray.get(actors[0].info.remote())
        # No Ray-level retries: a shard whose node or worker dies comes back here as an error and is
        # re-submitted with attempt + 1, so its stats record every attempt it took (Ray retries
        # would re-run it silently under the same attempt number).
        task = ray.remote(_shard_task).options(num_cpus=rt.shard_task_cpus, max_retries=0)
        cfg_ref = ray.put(cfg_dict)
        max_in_flight = rt.max_shards_in_flight or 2 * rt.num_generators
        in_flight: dict[Any, tuple[int, int]] = {}
        attempts: dict[int, int] = {}
        submitted = 0
        progress = BuildProgress(plan.target, plan.num_shards, enabled=rt.progress)
        progress.start(summary.accepted, summary.committed)
        t_first: float | None = None
        try:
            while pending or in_flight:
                while pending and len(in_flight) < max_in_flight:
                    if t_first is None:
                        t_first = time.time()
                    i = pending.popleft()
                    attempts[i] = attempts.get(i, 0) + 1
                    actor = actors[submitted % len(actors)]
                    detector = detectors[submitted % len(detectors)] if detectors else None
                    submitted += 1
                    ref = task.remote(cfg_ref, i, out, actor, detector, build_id, attempts[i], info)
                    in_flight[ref] = (i, attempts[i])
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
                for ref in ready:
                    i, attempt = in_flight.pop(ref)
                    name = plan.shard_name(i)
                    try:
                        stats = ray.get(ref)
                    except Exception as err:  # noqa: BLE001 - any shard error is retried, then recorded
                        if attempt <= cfg.build.shard_retries:
                            log.warning("shard %s attempt %d failed (%s); retrying", name, attempt, _short(err))
                            pending.appendleft(i)
                        else:
                            rec = _error_record(name, i, err, attempt)
                            record_failure(layout, name, rec)
                            summary.failed[name] = rec["error"]
                            log.error("shard %s failed after %d attempts: %s", name, attempt, rec["error"])
                            progress.shard_failed()
                        continue
                    clear_failure(layout, name)
                    summary.committed += 1
                    summary.accepted += int(stats["samples"])
                    summary.candidates += int(stats["candidates"])
                    for reason, n in stats["rejected"].items():
                        summary.rejected[reason] = summary.rejected.get(reason, 0) + int(n)
                    progress.shard_done(int(stats["samples"]), int(stats["candidates"]), summary.rejected)
                    del attempts[i]
                progress.tick()
            summary.shards_seconds = time.time() - t_first if t_first is not None else 0.0
            summary.generators = _actor_busy("generator", actors, summary.shards_seconds)
            summary.detectors = _actor_busy("detector", detectors, summary.shards_seconds)
            progress.actors_busy([b.describe() for b in [*summary.generators, *summary.detectors]])
        finally:
            progress.stop()
            for a in [*actors, *detectors]:
                ray.kill(a)
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
            ActorBusy(stage, refs[ref], b["node_ip"], b["calls"], b["images"], b["busy_s"], b["active_s"], frac)
        )
    return sorted(out, key=lambda g: g.actor)


def _short(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err
    return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
