"""Where a build's files live (docs/design.md, output layout), through one filesystem layer.

Every path goes through fsspec, so OUT may be a local directory or an object store URL such as
s3://bucket/mifa on a cluster (endpoint and credentials from the standard AWS_* environment).

Atomic publication differs by storage. On a filesystem a file is written under a temporary name,
flushed and renamed, since a rename is atomic there. On an object store a rename is copy + delete
(not atomic, and twice the traffic), while a whole-object PUT or a completed multipart upload is:
readers see no object or the whole one, never a prefix. So there objects go straight to their
final keys, each upload is checked (size) before the next step, and an interrupted upload is
aborted, never completed. The stats marker is still written last; a tar or parquet without a
valid marker is garbage that a resume deletes and redoes.

Transient store errors (503 SlowDown, 500, a reset connection) are retried by botocore in its
"standard" mode, with exponential backoff and jitter, up to S3_MAX_ATTEMPTS tries per request
(s3fs adds its own few retries for SlowDown on top). `store_retries()` counts botocore's retries
of the requests that went through, so a shard's stats say how flaky its store was; aiohttp's own
immediate re-send of an idempotent request whose reused connection the store reset is not seen.
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

#: fsspec protocols of object stores: whole-object writes are atomic, renames are copy + delete.
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss"})
#: Tries per S3 request (botocore's default is 3 in standard mode): a store that sheds load for
#: tens of seconds is waited out (backoff up to 20 s a try) rather than failing the shard.
S3_MAX_ATTEMPTS = 8
_S3_RETRIES = [0]  # retries of this process's S3 requests that went through (botocore's RetryAttempts)


def _count_retries(parsed: Any = None, **_: Any) -> None:
    """botocore after-call hook: add the retries the request took before it went through."""
    if isinstance(parsed, dict):
        _S3_RETRIES[0] += int(parsed.get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0)


class Layout:
    """Paths of one output directory: build.json, shards/, failed/."""

    def __init__(self, out: str):
        self.out = str(out).rstrip("/")
        protocol = fsspec.core.split_protocol(self.out)[0]
        # Object stores: no listing cache. Other processes (shard tasks, other nodes) write the
        # keys this process lists, and a cached listing would hide their commits.
        opts: dict[str, Any] = {"use_listings_cache": False} if protocol in OBJECT_STORE_PROTOCOLS else {}
        if protocol in ("s3", "s3a"):
            opts["config_kwargs"] = {"retries": {"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS}}
        self.fs, self.root = fsspec.core.url_to_fs(self.out, **opts)
        self.root = self.root.rstrip("/") or "/"
        self._counting = False

    def store_retries(self) -> int:
        """Retries of this process's S3 requests so far (0 elsewhere): a shard's count is the
        difference over its run (a shard worker runs one shard at a time)."""
        if not self._counting and hasattr(self.fs, "connect") and hasattr(self.fs, "call_s3"):
            client = self.fs.connect()  # s3fs's aiobotocore client, made once per filesystem instance
            client.meta.events.register("after-call.s3", _count_retries, unique_id="mifa-store-retries")
            self._counting = True
        return _S3_RETRIES[0]

    def __repr__(self) -> str:
        return f"Layout({self.out!r})"

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def is_object_store(self) -> bool:
        """Writes go straight to final keys (see the module docstring), not through a rename."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return bool(OBJECT_STORE_PROTOCOLS.intersection(protocols))

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

    @property
    def rejected_dir(self) -> str:
        """Kept rejected candidates, outside shards/ so that no glob of the corpus picks them up."""
        return self.path("rejected")

    def rejected_tar(self, name: str) -> str:
        """A few rejected candidates of shard NAME, kept for inspection (not part of the corpus)."""
        return self.path("rejected", f"{name}.tar")

    def stats(self, name: str) -> str:
        return self.path("shards", f"{name}.stats.json")

    def failed(self, name: str) -> str:
        return self.path("failed", f"{name}.json")

    def makedirs(self) -> None:
        """Create OUT's directories; on an object store (no directories) check that the bucket exists."""
        if self.is_object_store:
            bucket = self.root.split("/", 1)[0]
            if not self.fs.exists(bucket):
                raise FileNotFoundError(
                    f"{self.out}: bucket {bucket!r} does not exist or these credentials cannot see it; create it "
                    f"(e.g. `aws s3 mb s3://{bucket}`) or fix AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY"
                )
            return
        for d in (self.root, self.shards_dir, self.rejected_dir, self.failed_dir):
            self.fs.makedirs(d, exist_ok=True)

    def read_json(self, path: str) -> Any:
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read())

    def write_json_atomic(self, path: str, obj: Any) -> None:
        """Write JSON to a temporary name and rename it into place."""
        data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
        self.write_bytes_atomic(path, data)

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        """Publish DATA at PATH all at once: temp + rename on a filesystem, one checked PUT on a store."""
        if self.is_object_store:
            self.fs.pipe_file(path, data)
            self.check_uploaded(path, len(data))
            return
        tmp = self.temp_path(path)
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
                _fsync(f)
            self.fs.mv(tmp, path)
        except BaseException:
            self._remove_quietly(tmp)  # a full disk keeps no half-written temporary file
            raise

    def _remove_quietly(self, path: str) -> None:
        try:
            if self.fs.exists(path):
                self.fs.rm(path)
        except OSError as err:
            log.warning("could not remove %s: %s", path, err)

    def check_uploaded(self, path: str, size: int) -> None:
        """Raise unless the store holds PATH with SIZE bytes: what a later commit marker relies on."""
        self.fs.invalidate_cache(path)
        try:
            got = self.fs.info(path).get("size")
        except FileNotFoundError:
            got = None
        if got != size:
            raise OSError(f"upload of {path} is incomplete: the store holds {got} bytes, {size} were written")

    def discard_upload(self, f: Any) -> None:
        """Abandon a write in progress on an object store without publishing anything.

        Closing the file would complete the (multipart) upload and publish a partial object; discard
        aborts it instead, and marking the file closed keeps garbage collection from closing it.
        """
        try:
            discard = getattr(f, "discard", None)
            if callable(discard):
                discard()
        finally:
            f.closed = True

    def abort_incomplete_uploads(self, directory: str) -> list[str]:
        """Abort multipart uploads under DIRECTORY that a crashed writer left (invisible, but billed).

        Only for s3fs (other stores expire theirs); call it when no writer of this build runs.
        """
        call = getattr(self.fs, "call_s3", None)
        if not self.is_object_store or call is None:
            return []
        bucket, _, prefix = directory.partition("/")
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix.rstrip("/") + "/"}
        aborted: list[str] = []
        try:
            while True:
                resp = call("list_multipart_uploads", **kwargs)
                for u in resp.get("Uploads", []):
                    call("abort_multipart_upload", Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
                    aborted.append(f"{bucket}/{u['Key']}")
                if not resp.get("IsTruncated"):
                    break
                kwargs.update(KeyMarker=resp["NextKeyMarker"], UploadIdMarker=resp["NextUploadIdMarker"])
        except (PermissionError, OSError) as err:
            log.warning(
                "could not list/abort incomplete uploads under %s (%s); a bucket lifecycle rule "
                "AbortIncompleteMultipartUpload removes them instead",
                directory,
                err,
            )
        return aborted

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
