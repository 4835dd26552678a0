"""The Ray cluster a build runs on: joining or starting it (with token auth), where a process runs, and
whether the actors the config asks for fit its CPUs and GPUs."""

from __future__ import annotations

import logging
import os
from typing import Any

from .config import ConfigError, FactoryConfig

log = logging.getLogger(__name__)


def client_auth_mode() -> None:
    """Ray 2.60 clusters use token auth by default, but a client with RAY_AUTH_MODE unset sends no
    token. When a token is at hand (env or ~/.ray/auth_token) and the mode is unset, use it.
    Call it before ray is imported: ray reads the mode once."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        os.environ["RAY_AUTH_MODE"] = "token"
        log.info("RAY_AUTH_MODE unset and a Ray token is available: connecting with token auth")


def init_ray(cfg: FactoryConfig) -> bool:
    """Join RAY_ADDRESS / the job's cluster, or start an embedded local Ray. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    verbose = bool(os.environ.get("MIFA_VERBOSE"))
    # Ray's own notices (token auth on, the local IP it guessed) are for -v; errors always show
    kwargs: dict[str, Any] = {"logging_level": logging.INFO if verbose else logging.ERROR}
    env_vars = {k: v for k, v in os.environ.items() if k in ("MIFA_FAULTS", "MIFA_INJECT", "MIFA_VERBOSE")}
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


def node() -> dict[str, str]:
    """The node this process runs on (IP and Ray node id)."""
    import ray

    return {"node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id()}


def detectors_ask(cfg: FactoryConfig) -> tuple[float, float]:
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
    det_cpus, det_gpus = detectors_ask(cfg)
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


def check_resources(cfg: FactoryConfig, num_generators: int, resources: dict[str, float]) -> None:
    """Actors hold their CPUs and GPUs for the whole build: ones that do not fit wait forever, and
    actors that leave no CPU for a shard worker run nothing."""
    rt = cfg.runtime
    det_cpus, det_gpus = detectors_ask(cfg)
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
