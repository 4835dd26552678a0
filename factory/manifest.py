"""What is on disk: committed shards (by their stats marker), failed shards, leftovers to clean.

Resume looks only at the disk, the way img2dataset does: a shard with a valid stats JSON of this
build is done; anything else of it is removed and redone.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Any

from .config import FactoryConfig
from .layout import TMP_PREFIX, Layout
from .plan import Plan
from .record import read_record

log = logging.getLogger(__name__)

STATS_SUFFIX = ".stats.json"


@dataclass
class DiskState:
    committed: dict[str, dict[str, Any]]  # shard name -> stats
    failed: dict[str, dict[str, Any]]  # shard name -> last error record


def load_stats(layout: Layout, name: str, build_id: str) -> dict[str, Any] | None:
    """The stats marker of a shard if it is valid for this build, else None."""
    path = layout.stats(name)
    try:
        stats = layout.read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        log.warning("shard %s: unreadable marker %s (%s); the shard will be redone", name, path, err)
        return None
    if not isinstance(stats, dict) or not stats.get("committed") or stats.get("build_id") != build_id:
        log.warning("shard %s: marker %s is not a commit of build %s; the shard will be redone", name, path, build_id)
        return None
    return stats


def scan(layout: Layout, build_id: str) -> DiskState:
    committed: dict[str, dict[str, Any]] = {}
    for base in layout.listdir(layout.shards_dir):
        if base.endswith(STATS_SUFFIX) and not base.startswith(TMP_PREFIX):
            name = base[: -len(STATS_SUFFIX)]
            stats = load_stats(layout, name, build_id)
            if stats is not None:
                committed[name] = stats
    failed: dict[str, dict[str, Any]] = {}
    for base in layout.listdir(layout.failed_dir):
        if base.endswith(".json") and not base.startswith(TMP_PREFIX):
            try:
                failed[base[:-5]] = layout.read_json(layout.failed(base[:-5]))
            except (OSError, json.JSONDecodeError) as err:
                failed[base[:-5]] = {"error": f"unreadable failure record: {err}"}
    return DiskState(committed, failed)


def clean_uncommitted(layout: Layout, committed: dict[str, Any]) -> list[str]:
    """Remove temporary files and shard files without a valid marker; returns what was removed.

    On an object store this also aborts multipart uploads left under shards/ by a crashed writer.
    Run it before any shard task of this build starts: it takes every such file for garbage.
    """
    removed: list[str] = []
    for d in (layout.shards_dir, layout.rejected_dir, layout.failed_dir, layout.root):
        for base in layout.listdir(d):
            path = posixpath.join(d, base)
            stem = base.split(".", 1)[0]
            shard_file = d in (layout.shards_dir, layout.rejected_dir)
            orphan = shard_file and stem not in committed and not base.startswith(TMP_PREFIX)
            if base.startswith(TMP_PREFIX) or orphan:
                if layout.fs.isdir(path):
                    log.warning("leaving directory %s in place: not a file this factory writes", path)
                    continue
                removed.append(path)
    if removed:
        layout.fs.rm(removed)  # one call: a bulk delete on an object store
    aborted = layout.abort_incomplete_uploads(layout.shards_dir)
    if removed or aborted:
        log.info(
            "removed %d temporary or uncommitted files and aborted %d incomplete uploads in %s",
            len(removed),
            len(aborted),
            layout.out,
        )
    return removed + aborted


def record_failure(layout: Layout, name: str, record: dict[str, Any]) -> None:
    layout.write_json_atomic(layout.failed(name), record)


def clear_failure(layout: Layout, name: str) -> None:
    path = layout.failed(name)
    if layout.fs.exists(path):
        layout.fs.rm(path)


@dataclass
class Build:
    """An existing output as readers (verify, report) see it: its record, config, plan and disk state."""

    layout: Layout
    record: dict[str, Any]
    cfg: FactoryConfig
    plan: Plan
    state: DiskState


def open_build(out: str) -> Build:
    layout = Layout(out)
    record, cfg = read_record(layout)
    return Build(layout, record, cfg, Plan(cfg), scan(layout, record["build_id"]))
