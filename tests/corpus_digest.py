"""A digest of what a build committed: shard and rejected tars byte for byte, parquet rows, stats.

Used by tests/test_corpus_digest.py to show that a refactor changes no byte of a corpus: the
digest of a fixed small build is checked in (tests/data/corpus_digest.json) and every run of the
suite rebuilds that corpus and compares. Parquet files are compared by schema and rows, not bytes
(their footer names the pyarrow version that wrote them); stats markers without the fields that
name the machine or the clock. The generator's provenance tag (`puppet@HASH`, HASH a hash of the
renderer's source text) is read as its name alone: it changes with any edit of those modules,
comments and import lines included, while every image, label and score must stay the same. A stats
marker's own sha256 of each file it committed is of the raw bytes, tag included, so it is left out:
those files are compared above, tag cut.

Regenerate after an intended change of what a build writes:
    MIFA_WRITE_DIGEST=1 bash tests/run.sh tests/test_corpus_digest.py
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

#: Fields of a stats marker that say where and when, not what.
VOLATILE = ("timings", "node", "node_ip", "node_id", "worker_id")

#: The build the digest is of: the exact puppet generator with the detectors on and spoiled
#: samples injected, so that every check rejects something and rejected samples are kept.
ARGS = ["--target", "90", "--shard-size", "30", "--set", "build.rejected_samples=2"]
INJECT = "blank:0.04,noise:0.04,wrong_expression:0.08"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _untag(obj: Any) -> Any:
    """`obj` with every generator provenance tag NAME@HASH cut to NAME."""
    if isinstance(obj, dict):
        return {k: (v.split("@")[0] if k == "generator" and isinstance(v, str) else _untag(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_untag(v) for v in obj]
    return obj


def _tar_digest(path: Path) -> str:
    """Every member's name, mode and bytes in order; JSON members with the provenance tag cut."""
    h = hashlib.sha256()
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read() if m.isfile() else b""
            if m.name.endswith(".json"):
                data = json.dumps(_untag(json.loads(data)), sort_keys=True).encode()
            h.update(f"{m.name}\0{m.mode}\0{m.uname}\0{m.mtime}\0{len(data)}\0".encode())
            h.update(data)
    return h.hexdigest()


def digest(out: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    files: dict[str, str] = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if not p.is_file() or rel == "build.json" or "/.tmp-" in f"/{rel}" or rel.startswith("cache/"):
            continue
        if p.suffix == ".tar":
            files[rel] = _tar_digest(p)
        elif p.suffix == ".parquet":
            t = pq.read_table(p)
            files[rel] = _sha((str(t.schema) + json.dumps(_untag(t.to_pylist()), sort_keys=True)).encode())
        elif rel.endswith(".stats.json"):
            stats = _untag({k: v for k, v in json.loads(p.read_text()).items() if k not in VOLATILE})
            for f in stats.get("files", {}).values():
                f.pop("sha256", None)
            files[rel] = _sha(json.dumps(stats, sort_keys=True).encode())
        else:
            files[rel] = _sha(p.read_bytes())
    record = json.loads((out / "build.json").read_text())
    return {"build_id": record["build_id"], "files": files}
