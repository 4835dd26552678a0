"""The Ray actors of a build: actors own models (loaded once) and shard workers drive shards through them.

GeneratorActor holds one generator, DetectorActor the AU detectors and the realism model, and
ShardWorker runs one shard at a time for the whole build. Generator and detector actors count
the seconds spent inside their calls (`busy`), so a build can say which stage held it up.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .cluster import node
from .config import ConfigError, FactoryConfig
from .sizing import GENERATOR_THREADS, Sizing

log = logging.getLogger(__name__)


class ModelLoadError(ConfigError):
    """An actor could not load a configured model (missing, corrupt or mismatched file)."""


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
    threads: int = 0  # intra-op threads it computes with (torch for a generator, ONNX Runtime for a detector)

    def describe(self) -> str:
        call = "generate" if self.stage == "generator" else "detect"
        return (
            f"{self.stage} {self.actor} busy {self.fraction:.3f} ({self.busy_s:.1f} s in {call}, "
            f"{self.calls} calls, {self.images} images, active {self.active_s:.1f} s, {self.threads} "
            f"thread{'' if self.threads == 1 else 's'}, node {self.node_ip}"
            + (f", GPU {','.join(self.gpu_ids)})" if self.gpu_ids else ")")
        )


class _BusyMeter:
    """Counts an actor's calls, images and seconds inside them, for the driver's busy fraction."""

    def __init__(self) -> None:
        self.calls = 0
        self.images = 0
        self.busy_s = 0.0
        self.first_start: float | None = None
        self.last_end: float | None = None

    def threads(self) -> int:
        """Intra-op threads the actor's model computes with."""
        raise NotImplementedError

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
        return node()

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
            "threads": self.threads(),
        }


def quiet_libraries() -> None:
    """Keep diffusers' and transformers' loading bars and info lines out of the user's terminal (Ray
    forwards every actor's output there); MIFA_VERBOSE=1 (`factory build -v`) keeps them."""
    if os.environ.get("MIFA_VERBOSE"):
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def _load(load: Callable[[], Any]) -> tuple[Any, str | None]:
    """(the model, None), or (None, the error's line) when it cannot load. An actor must not raise from
    __init__ for a bad model file: Ray would restart it and print its traceback in the user's terminal
    for every try; the driver turns the returned error into one line (start_model_actors)."""
    try:
        return load(), None
    except Exception as err:  # noqa: BLE001 - any load failure is reported by the driver, as one line
        return None, f"{type(err).__name__}: {err}".splitlines()[0]


class GeneratorActor(_BusyMeter):
    """Owns one generator (model loaded once) and serves batches to shard tasks."""

    def __init__(self, cfg_dict: dict[str, Any], threads: int | None = None):
        """`threads`: torch intra-op threads of a torch generator (the build passes sizing.GENERATOR_THREADS;
        None: torch's own). A generator that does not use torch imports neither it nor diffusers."""
        from .generators import generator_class, make_generator

        super().__init__()
        cfg = FactoryConfig.model_validate(cfg_dict)
        self.uses_torch = generator_class(cfg).uses_torch
        if self.uses_torch:
            if threads is not None:
                import torch

                torch.set_num_threads(threads)
            quiet_libraries()
        self.generator, self.load_error = _load(lambda: make_generator(cfg))

    def threads(self) -> int:
        """torch's intra-op threads; 1 for a generator without torch (the puppet renderer: numpy, one thread)."""
        if not self.uses_torch:
            return 1
        import torch

        return torch.get_num_threads()

    def info(self) -> dict[str, Any]:
        """Name and version (the samples' provenance tag), the image size it makes, and whether it
        needs exemplars and masks with each batch; {"load_error": ...} when its model did not load."""
        g = self.generator
        if g is None:
            return {"load_error": self.load_error}
        return {"name": g.name, "version": g.version, "image_size": g.image_size, "needs_exemplars": g.needs_exemplars}

    def generate(self, batch: Any) -> Any:
        if self.generator is None:
            raise RuntimeError(f"the generator did not load: {self.load_error}")
        return self._metered(self.generator.generate, batch)


class DetectorActor(_BusyMeter):
    """Owns the AU detectors and the realism discriminator (ONNX sessions loaded once), and with the
    generator's training subjects' embeddings (factory/leakage.py) the identity encoder that measures
    each face's similarity to them."""

    def __init__(self, cfg_dict: dict[str, Any], training_subjects: dict[str, str] | None = None):
        """`training_subjects` ({file, sha256}: the file the driver planned with, read here on the actor's
        node and checked against that hash) turns on the training-similarity measure."""
        from detectors.panel import DetectorPanel

        from .leakage import read_embeddings

        super().__init__()
        cfg = FactoryConfig.model_validate(cfg_dict)
        d = cfg.detect
        self._threads = cfg.runtime.detector_threads_used
        self.panel, self.load_error = _load(
            lambda: DetectorPanel(
                d.au_detectors,
                d.min_agree,
                realism=d.realism,
                threads=cfg.runtime.detector_threads_used,
                occurrence_threshold=cfg.labels.occurrence_threshold,
                batch_size=d.batch_size,
                identity_encoder=d.identity_encoder,
                training_subjects=read_embeddings(**training_subjects) if training_subjects else None,
            )
        )

    def threads(self) -> int:
        return self._threads

    def describe(self) -> dict[str, Any]:
        """The models' provenance; {"load_error": ...} when they did not load."""
        return {"load_error": self.load_error} if self.panel is None else self.panel.describe()

    def detect(self, images: Any) -> Any:
        if self.panel is None:
            raise RuntimeError(f"the detectors did not load: {self.load_error}")
        return self._metered(self.panel.detect, images)


class ShardWorker:
    """Runs shard tasks, one at a time, in a process that lives for the whole build.

    Why an actor and not a Ray task per shard: Ray keeps only about `num_cpus` idle workers per
    node and kills an extra idle one after a second, so tasks spread over several nodes kept
    landing on fresh worker processes, each importing torch and the factory again
    (bench/bench_cluster_scaling.py measures it). A shard task is still small and idempotent: the
    driver re-submits a failed one, here or on another worker, with attempt + 1. The actor runs two
    threads (max_concurrency=2) so that `live()` answers while `run()` works: a MAUGen shard takes
    minutes to fill.
    """

    def __init__(self) -> None:
        self._live: tuple[int, int, dict[str, Any]] = (0, 0, {})

    def live(self) -> tuple[int, int, dict[str, Any]]:
        """(accepted, candidates, expander stats) of the shard running now, as of its last round."""
        return self._live

    def where(self) -> dict[str, str]:
        """This worker's node, which the driver uses to hand it node-local generators and detectors."""
        return node()

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
        submitted: float | None = None,
    ) -> dict[str, Any]:
        import ray

        from .shard import run_shard

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        cfg = FactoryConfig.model_validate(cfg_dict)
        self._live = (0, 0, {})

        def on_round(accepted: int, candidates: int, expand: dict[str, Any]) -> None:
            self._live = (accepted, candidates, expand)

        return run_shard(
            cfg,
            index,
            out,
            generate=lambda batch: ray.get(generator.generate.remote(batch)),
            build_id=build_id,
            attempt=attempt,
            generator_info=info,
            detect=(lambda images: ray.get(detector.detect.remote(images))) if detector is not None else None,
            node={**node(), "worker_id": ray.get_runtime_context().get_actor_id()},
            on_round=on_round,
            submitted=submitted,
        )


def start_model_actors(
    cfg: FactoryConfig, sizing: Sizing, training_subjects: dict[str, str] | None = None
) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Start the generator and detector actors `sizing` names and wait until each has loaded its model;
    returns (generators, detectors, the generator's name and version). `training_subjects` ({file,
    sha256}; None: not measured) go to every detector actor. Models that cannot load are one
    ModelLoadError with a line naming each (detectors, generator), not an actor-death traceback."""
    import ray

    cfg_dict = cfg.model_dump(mode="json")
    gen_cls = ray.remote(GeneratorActor).options(
        num_cpus=sizing.generator_cpus, num_gpus=sizing.generator_gpus, max_restarts=3, max_task_retries=2
    )
    generators = [gen_cls.remote(cfg_dict, GENERATOR_THREADS) for _ in range(sizing.generators)]
    detectors: list[Any] = []
    if sizing.detectors:
        det_cls = ray.remote(DetectorActor).options(
            num_cpus=sizing.detector_cpus, num_gpus=sizing.detector_gpus, max_restarts=3, max_task_retries=2
        )
        detectors = [det_cls.remote(cfg_dict, training_subjects) for _ in range(sizing.detectors)]
    # every model is waited for before any error is raised, so a user with two broken models learns of both
    failed: list[str] = []
    if detectors:
        _, error = _await_loaded([d.describe.remote() for d in detectors])
        if error:
            failed.append(f"the detector actors could not load their models: {error}")
    infos, error = _await_loaded([a.info.remote() for a in generators])
    if error:
        failed.append(f"the generator actors could not load their model: {error}")
    if failed:
        raise ModelLoadError("\n".join(failed))
    return generators, detectors, infos[0]


def _await_loaded(calls: list[Any]) -> tuple[list[dict[str, Any]], str | None]:
    """The replies of model actors' describe()/info() calls, and the first load error among them (an
    actor that died loading counts, by its cause)."""
    import ray

    try:
        replies = ray.get(calls)
    except ray.exceptions.RayActorError as err:
        return [], actor_cause(err)
    return replies, next((x["load_error"] for x in replies if "load_error" in x), None)


def actor_cause(err: BaseException) -> str:
    """The original exception line out of a Ray actor-death error (its text embeds the traceback)."""
    text = str(err)
    for line in reversed(text.splitlines()):
        line = line.strip()
        if "Error:" in line and not line.startswith(("ray.", "File ")):
            return line
    return text.splitlines()[0] if text else type(err).__name__


def actor_busy(stage: str, actors: list[Any], window_s: float, timeout_s: float = 10.0) -> list[ActorBusy]:
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
            log.warning("%s %d: no busy accounting (%s)", stage, refs[ref], short_error(err))
            continue
        frac = b["busy_s"] / window_s if window_s > 0 else 0.0
        out.append(
            ActorBusy(
                stage, refs[ref], b["node_ip"], b["calls"], b["images"], b["busy_s"], b["active_s"], frac, b["gpu_ids"],
                b["threads"],
            )
        )
    return sorted(out, key=lambda g: g.actor)


def error_cause(err: BaseException) -> BaseException:
    """The exception a shard raised, out of the RayTaskError that carries it to the driver."""
    return getattr(err, "cause", None) or err


def short_error(err: BaseException) -> str:
    cause = error_cause(err)
    return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
