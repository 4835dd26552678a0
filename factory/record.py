"""OUT/build.json, the build record: written once by `prepare_output`, read by everyone through `read_record`.

It freezes the config (and its identity hash, the build id), the sha256 of every model file the
build uses, the plan's size and the library versions. A build on an OUT that holds another
config or other model files is refused, so one corpus never mixes two builds (docs/design.md).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from importlib import metadata
from typing import Any

from .config import ConfigError, FactoryConfig, config_diff
from .layout import Layout
from .leakage import LeakagePlan, plan_leakage
from .plan import Plan

log = logging.getLogger(__name__)


class BuildRecordError(ConfigError):
    """OUT/build.json does not parse or is not a factory build record."""


class BuildConfigMismatch(ConfigError):
    """OUT holds a build with another config; resuming it under this one would mix two corpora."""


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("mifa-factory", "ray", "numpy", "pillow", "webdataset", "pyarrow", "pydantic", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def read_record(layout: Layout) -> tuple[dict[str, Any], FactoryConfig]:
    """OUT/build.json and the config in it; a missing one is FileNotFoundError, a bad one BuildRecordError."""
    if not layout.fs.exists(layout.build_json):
        raise FileNotFoundError(
            f"{layout.out} has no build.json: not a factory output (run `factory build --out {layout.out}`)"
        )
    try:
        record = layout.read_json(layout.build_json)
        cfg = FactoryConfig.model_validate(record["config"])
        if not isinstance(record["build_id"], str):
            raise TypeError(f"build_id is {record['build_id']!r}")
        if not isinstance(record["identity"], dict):
            raise TypeError(f"identity is {record['identity']!r}")
    except (ValueError, KeyError, TypeError, OSError) as err:  # JSONDecodeError and ValidationError are ValueErrors
        raise BuildRecordError(
            f"{layout.build_json} is unreadable or not a factory build record ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else err!r}); restore it from the run that made OUT, or "
            f"start over with `factory build --out {layout.out} --new-build` and its config"
        ) from None
    return record, cfg


def prepare_output(
    cfg: FactoryConfig, out: str, new_build: bool = False, leakage: LeakagePlan | None = None
) -> tuple[Layout, dict[str, Any]]:
    """Create OUT or check that it holds this very build; returns its build.json.

    `leakage` (factory/leakage.py, worked out here when not given) decides whether the build measures
    training similarity; the file it uses is hashed with the models, and the decision is recorded.
    """
    layout = Layout(out)
    models = model_hashes(cfg)  # a missing model file fails here, before OUT is touched
    if leakage is None:
        leakage = plan_leakage(cfg)  # so does a check that cannot be applied
    layout.makedirs()
    build_id = cfg.identity_hash()
    old = _existing_record(layout, new_build)
    leakage = leakage.for_record(None if new_build else old)  # a build from before the check resumes unmeasured
    models |= leakage.model_hashes(cfg.maugen.checkpoint)
    if old is not None:
        old_identity = old["identity"]
        same_config = old.get("build_id") == build_id and old_identity == cfg.identity_dict()
        if same_config and old.get("models", {}) == models:
            _check_injection(old, out)
            return layout, old
        if same_config and not new_build:
            raise BuildConfigMismatch(
                f"{out} holds build {build_id} made with other model files or photos (generator checkpoint, detectors or identity pool) "
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
        delete_build(layout)
    plan = Plan(cfg)
    record = {
        "build_id": build_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "identity": cfg.identity_dict(),
        "config": cfg.model_dump(mode="json"),
        "models": models,
        "plan": {"target": plan.target, "shard_size": plan.shard_size, "num_shards": plan.num_shards},
        # identity leakage: whether each sample's similarity to MAUGen's training subjects is measured, or why not
        "training_similarity": leakage.record(),
        "versions": versions(),
        # chaos testing (factory/faults.py): MIFA_INJECT spoils samples, so it changes what the corpus holds
        "faults": {k: os.environ[k] for k in FAULT_ENV if os.environ.get(k)},
    }
    layout.write_json_atomic(layout.build_json, record)
    return layout, record


FAULT_ENV = ("MIFA_FAULTS", "MIFA_INJECT")


def _check_injection(record: dict[str, Any], out: str) -> None:
    """A resume spoils samples exactly as the build did (MIFA_INJECT), or the corpus would mix two kinds."""
    was, now = record.get("faults", {}).get("MIFA_INJECT"), os.environ.get("MIFA_INJECT") or None
    if was != now:
        raise BuildConfigMismatch(
            f"{out} was built with MIFA_INJECT={was or '(unset)'} (build.json) but this run has "
            f"MIFA_INJECT={now or '(unset)'}; resume with the same MIFA_INJECT, or start over with --new-build"
        )


def _existing_record(layout: Layout, new_build: bool) -> dict[str, Any] | None:
    """OUT's build.json, or None when there is none. An unreadable one is an error, unless --new-build
    is deleting OUT anyway."""
    try:
        return read_record(layout)[0]
    except FileNotFoundError:
        return None
    except BuildRecordError as err:
        if not new_build:
            raise
        log.warning("--new-build: deleting %s, whose build.json is unreadable (%s)", layout.out, err)
        delete_build(layout)
        return None


def delete_build(layout: Layout) -> None:
    """--new-build: remove every shard, rejected sample, failure record and the build record."""
    for d in (layout.shards_dir, layout.rejected_dir, layout.failed_dir):
        if layout.fs.exists(d):
            layout.fs.rm(d, recursive=True)
    if layout.fs.exists(layout.build_json):
        layout.fs.rm(layout.build_json)
    layout.makedirs()


def model_hashes(cfg: FactoryConfig) -> dict[str, str]:
    """sha256 of the MAUGen checkpoint, of every model file the filters use and of the identity pool
    (checked again on resume). Opening the pool here also checks it against the plan, before OUT is touched."""
    hashes: dict[str, str] = {}
    if cfg.identities.source == "pool":
        from .identities import identity_source

        source = identity_source(cfg)
        source.check_plan(cfg.plan)
        hashes[f"identities:{cfg.identities.pool}"] = source.content_hash()
    if cfg.generator == "maugen":
        from pipelines.maugen.builtin import checkpoint_hash, resolve_checkpoint

        hashes[f"maugen:{cfg.maugen.checkpoint}"] = checkpoint_hash(resolve_checkpoint(cfg.maugen.checkpoint))
    if cfg.detect.enabled:
        from detectors.panel import model_hashes as detector_hashes

        refs = list(cfg.detect.au_detectors) + ([cfg.detect.realism] if cfg.detect.realism else [])
        hashes |= detector_hashes(refs)
    return hashes
