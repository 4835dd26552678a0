"""The Ray cluster a build runs on: joining or starting it (with token auth) and where a process runs
(factory/sizing.py sizes the actors to it)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from .config import FactoryConfig

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


def worker_env(cfg: FactoryConfig) -> dict[str, str]:
    """The driver's env vars that its Ray workers read: fault injection and verbosity (MIFA_*) and the API
    key that expand.llm.api_key_env names. A local Ray's workers inherit the driver's env, but the workers
    of a cluster it joins have their node's, so a key set only where `factory build` runs would reach the
    driver's preflight and not the shard workers that call the LLM. (Ray shows a job's env vars to whoever
    can list its jobs.)"""
    names = {"MIFA_FAULTS", "MIFA_INJECT", "MIFA_VERBOSE"}
    if cfg.expand.backend == "llm" and cfg.expand.llm is not None:
        names.add(cfg.expand.llm.api_key_env)
    names -= _job_env_vars()
    return {k: v for k, v in os.environ.items() if k in names}


def _job_env_vars() -> set[str]:
    """The env vars of the job this driver runs in (`ray job submit --runtime-env-json`), which its workers
    get anyway and which ray.init refuses to be given twice. Ray hands a job's config to its entrypoint in
    RAY_JOB_CONFIG_JSON_ENV_VAR."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    try:
        env_vars = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return set()
    return set(env_vars)


def init_ray(cfg: FactoryConfig) -> bool:
    """Join RAY_ADDRESS / the job's cluster, or start an embedded local Ray. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    verbose = bool(os.environ.get("MIFA_VERBOSE"))
    # Ray's own notices (token auth on, the local IP it guessed) are for -v; errors always show
    kwargs: dict[str, Any] = {"logging_level": logging.INFO if verbose else logging.ERROR}
    env_vars = worker_env(cfg)
    if env_vars:
        kwargs["runtime_env"] = {"env_vars": env_vars}
        log.info("passing the driver's %s to the build's Ray workers", ", ".join(sorted(env_vars)))
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
