"""Where a build's files live (DESIGN.md's output layout), through one filesystem layer.

Every path goes through fsspec, so OUT may be a local directory or an object store URL such as
s3://bucket/mifa on a cluster; local paths are what the tests use.
"""

from __future__ import annotations

import json
import logging
import posixpath
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


class Layout:
    """Paths of one output directory: build.json, shards/, failed/."""

    def __init__(self, out: str):
        self.out = str(out).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.out)
        self.root = self.root.rstrip("/") or "/"

    def __repr__(self) -> str:
        return f"Layout({self.out!r})"

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    @property
    def build_json(self) -> str:
        return self.path("build.json")

    @property
    def shards_dir(self) -> str:
        return self.path("shards")

    @property
    def failed_dir(self) -> str:
        return self.path("failed")

    @property
    def cache_dir(self) -> str:
        """Where expanders cache LLM replies, so a resumed build never asks twice."""
        return self.out + "/cache"

    def tar(self, name: str) -> str:
        return self.path("shards", f"{name}.tar")

    def parquet(self, name: str) -> str:
        return self.path("shards", f"{name}.parquet")

    def stats(self, name: str) -> str:
        return self.path("shards", f"{name}.stats.json")

    def failed(self, name: str) -> str:
        return self.path("failed", f"{name}.json")

    def makedirs(self) -> None:
        for d in (self.root, self.shards_dir, self.failed_dir):
            self.fs.makedirs(d, exist_ok=True)

    def read_json(self, path: str) -> Any:
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read())

    def write_json_atomic(self, path: str, obj: Any) -> None:
        """Write JSON to a temporary name and rename it into place."""
        data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
        self.write_bytes_atomic(path, data)

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        tmp = self.temp_path(path)
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
            _fsync(f)
        self.fs.mv(tmp, path)

    def temp_path(self, path: str) -> str:
        import uuid

        d, base = posixpath.split(path)
        return posixpath.join(d, f"{TMP_PREFIX}{base}.{uuid.uuid4().hex[:12]}")

    def listdir(self, path: str) -> list[str]:
        """Base names in a directory; an absent directory is empty."""
        if not self.fs.exists(path):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))


def _fsync(f: Any) -> None:
    """Flush a local file to disk before its rename, so a crash cannot leave a renamed empty file."""
    import os

    f.flush()
    fileno = getattr(f, "fileno", None)
    if fileno is not None:
        try:
            os.fsync(fileno())
        except (OSError, ValueError, AttributeError, NotImplementedError):
            pass
