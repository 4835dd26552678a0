"""`factory verify OUT`: prove that what is on disk is the corpus the markers promise.

Per shard: the tar's and parquet's checksums and sizes against the marker, every sample complete
and decodable, the sample count against the plan, keys unique and carrying the shard's name
(so keys are unique across the corpus), parquet rows equal to the tar's keys in order.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from core.facs import NUM_AUS

from .layout import Layout
from .manifest import STATS_SUFFIX, open_build

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    shards: int = 0
    ok: int = 0
    samples: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, problem: str) -> None:
        self.problems.setdefault(name, []).append(problem)

    @property
    def passed(self) -> bool:
        return not self.problems


def _sha256(layout: Layout, path: str) -> tuple[str, int, bytes]:
    with layout.fs.open(path, "rb") as f:
        data = f.read()
    return hashlib.sha256(data).hexdigest(), len(data), data


def verify_shard(layout: Layout, name: str, stats: dict, expected_size: int, report: VerifyReport) -> None:
    files = stats.get("files", {})
    tar_keys: list[str] = []
    for kind, path in (("tar", layout.tar(name)), ("parquet", layout.parquet(name))):
        if not layout.fs.exists(path):
            report.add(name, f"{kind} missing: {path}")
            continue
        sha, size, data = _sha256(layout, path)
        want = files.get(kind, {})
        if sha != want.get("sha256") or size != want.get("bytes"):
            report.add(name, f"{kind} checksum mismatch ({size} bytes, marker says {want.get('bytes')})")
        if kind == "tar":
            tar_keys = _check_tar(name, data, stats, report)
        else:
            _check_parquet(name, data, tar_keys, report)
    kept = files.get("rejected")
    if kept:  # the few rejected candidates kept for inspection: checked for integrity, not counted
        path = layout.rejected_tar(name)
        if not layout.fs.exists(path):
            report.add(name, f"rejected-samples tar missing: {path}")
        else:
            sha, size, _ = _sha256(layout, path)
            if sha != kept.get("sha256") or size != kept.get("bytes"):
                report.add(
                    name, f"rejected-samples tar checksum mismatch ({size} bytes, marker says {kept.get('bytes')})"
                )
    if stats.get("samples") != expected_size:
        report.add(name, f"marker counts {stats.get('samples')} samples, the plan {expected_size}")
    if tar_keys and len(tar_keys) != expected_size:
        report.add(name, f"tar holds {len(tar_keys)} samples, the plan {expected_size}")


def _check_tar(name: str, data: bytes, stats: dict, report: VerifyReport) -> list[str]:
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                elif order[-1] != key:
                    report.add(name, f"key {key} appears twice")
                if ext in samples[key]:
                    report.add(name, f"key {key} has {ext} twice")
                samples[key][ext] = tf.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        report.add(name, f"tar unreadable: {err}")
        return order
    for key in order:
        fields = samples[key]
        if not key.startswith(name + "-"):
            report.add(name, f"key {key} does not carry the shard name (keys must be unique across the corpus)")
        img_ext = "png" if "png" in fields else "jpg" if "jpg" in fields else None
        missing = [e for e in ("json", "au.npy") if e not in fields] + ([] if img_ext else ["png|jpg"])
        if missing:
            report.add(name, f"sample {key} lacks {', '.join(missing)}")
            continue
        try:
            meta = json.loads(fields["json"])
            au = np.load(io.BytesIO(fields["au.npy"]), allow_pickle=False)
            with Image.open(io.BytesIO(fields[img_ext])) as im:
                im.load()
        except Exception as err:  # noqa: BLE001 - any decoding problem is reported per sample
            report.add(name, f"sample {key} does not decode: {err}")
            continue
        named = meta.get("key") if isinstance(meta, dict) else meta
        if named != key:
            report.add(name, f"sample {key}: its json names key {named!r}")
        if au.shape != (2, NUM_AUS) or au.dtype.kind not in "fiu" or not np.isfinite(au).all():
            report.add(name, f"sample {key}: au.npy is {au.shape} {au.dtype}, want finite (2, {NUM_AUS})")
    return order


def _check_parquet(name: str, data: bytes, tar_keys: list[str], report: VerifyReport) -> None:
    try:
        # one thread: verify reads small files, and a live Arrow pool at exit has aborted the process
        table = pq.read_table(io.BytesIO(data), use_threads=False)
    except Exception as err:  # noqa: BLE001
        report.add(name, f"parquet unreadable: {err}")
        return
    keys = table.column("key").to_pylist()
    if tar_keys and keys != tar_keys:
        report.add(name, f"parquet keys ({len(keys)}) differ from the tar's ({len(tar_keys)})")


def verify(out: str) -> VerifyReport:
    b = open_build(out)
    layout, plan, state = b.layout, b.plan, b.state
    report = VerifyReport(shards=plan.num_shards)
    planned = set()
    for i in range(plan.num_shards):
        name = plan.shard_name(i)
        planned.add(name)
        stats = state.committed.get(name)
        if stats is None:
            why = "failed: " + state.failed[name].get("error", "?") if name in state.failed else "not committed"
            report.add(name, why)
            continue
        before = len(report.problems.get(name, []))
        verify_shard(layout, name, stats, plan.shard_bounds(i)[1] - plan.shard_bounds(i)[0], report)
        if len(report.problems.get(name, [])) == before:
            report.ok += 1
            report.samples += int(stats["samples"])
    for base in layout.listdir(layout.shards_dir):
        stem = base.split(".", 1)[0]
        if stem not in planned and base.endswith(STATS_SUFFIX):
            report.add(stem, "shard not in the plan of build.json")
    return report
