"""`factory build|resume|verify|report` with OUT on S3 (a moto server on loopback).

On an object store a rename is copy + delete, so the writer puts objects straight to their final
keys (a completed upload is atomic) and writes the stats marker last; resume must delete unmarked
objects, stray temporary keys and incomplete multipart uploads, and redo exactly those shards.
The shard tasks run in Ray worker processes: that they reach the server at all shows that they
inherit the driver's AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import FAST, SMALL_RAY, factory

from factory.layout import Layout
from factory.manifest import clean_uncommitted, scan
from factory.writer import ShardWriter, au_array

BUCKET = "mifa-build"
PREFIX = f"{BUCKET}/mifa"
URL = f"s3://{PREFIX}"
SHARDS = [f"mifa-{i:06d}" for i in range(4)]
ARGS = ["--target", "40", "--shard-size", "10", *FAST, "--set", "build.shard_retries=0"]


def _listing(fs: Any, d: str) -> list[str]:
    return sorted(posixpath.basename(p) for p in fs.find(d))


def _uploads(fs: Any, prefix: str) -> list[str]:
    bucket, _, key = prefix.partition("/")
    return [u["Key"] for u in fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", [])]


@pytest.fixture(scope="module")
def s3_build(s3_env) -> dict[str, Any]:
    """A build to S3 where shard 1 fails at its write stage, what it left, then a resume."""
    env, fs = s3_env
    fs.mkdir(BUCKET)
    first = factory("build", "--out", URL, *ARGS, env={**env, "MIFA_FAULTS": "write:1"})
    after_first = {
        "shards": _listing(fs, f"{PREFIX}/shards"),
        "failed": json.loads(fs.cat(f"{PREFIX}/failed/mifa-000001.json")),
        "uploads": _uploads(fs, PREFIX),
    }
    resumed = factory("resume", URL, *SMALL_RAY, env=env)
    return {"env": env, "fs": fs, "first": first, "after_first": after_first, "resumed": resumed}


def test_failed_shard_on_s3_leaves_no_object_and_resume_completes(s3_build):
    first, after, resumed, fs = s3_build["first"], s3_build["after_first"], s3_build["resumed"], s3_build["fs"]
    assert first.returncode == 1, first.stderr[-3000:]
    assert "FAILED mifa-000001" in first.stderr
    assert after["failed"]["attempts"] == 1 and "InjectedFault" in after["failed"]["error"]
    # the failed attempt published nothing: no tar, no parquet, no temporary key, no open upload
    kept = ("mifa-000000", "mifa-000002", "mifa-000003")
    want = sorted(f"{n}.{ext}" for n in kept for ext in ("tar", "parquet", "stats.json"))
    assert after["shards"] == want
    assert after["uploads"] == []

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(3 shards were already done)" in resumed.stderr
    assert not fs.exists(f"{PREFIX}/failed/mifa-000001.json")


def test_s3_build_verifies_and_parquet_rows_match_tar_samples(s3_build):
    env, fs = s3_build["env"], s3_build["fs"]
    v = factory("verify", URL, env=env)
    assert v.returncode == 0, v.stdout + v.stderr[-3000:]
    assert "4/4 shards verified, 40 samples" in v.stdout
    want = sorted(f"{n}.{e}" for n in SHARDS for e in ("tar", "parquet", "stats.json"))
    assert _listing(fs, f"{PREFIX}/shards") == want
    for name in SHARDS:
        with tarfile.open(fileobj=io.BytesIO(fs.cat(f"{PREFIX}/shards/{name}.tar"))) as tf:
            keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in tf if m.isfile()))
        table = pq.read_table(io.BytesIO(fs.cat(f"{PREFIX}/shards/{name}.parquet")), use_threads=False)
        assert table.column("key").to_pylist() == keys and len(keys) == 10
    rep = json.loads(factory("report", URL, "--json", "--samples", "2", env=env, check=True).stdout)
    assert rep["shards"] == {"total": 4, "done": 4, "failed": 0, "pending": 0} and rep["accepted"] == 40


@pytest.mark.slow  # the default suite stays under 15 min; `bash tests/run.sh -m slow` runs it
def test_resume_after_crash_redoes_exactly_the_unmarked_shard(s3_build):
    env, fs = s3_build["env"], s3_build["fs"]
    assert s3_build["resumed"].returncode == 0
    shards = f"{PREFIX}/shards"
    tars = {n: fs.cat(f"{shards}/{n}.tar") for n in SHARDS}
    markers = {n: fs.cat(f"{shards}/{n}.stats.json") for n in SHARDS}

    # shard 2 "crashed" after its tar and before its marker; the tar is replaced by garbage so that a
    # kept tar cannot pass for a redone one. Plus a stray temporary key and an open multipart upload.
    fs.rm([f"{shards}/mifa-000002.stats.json", f"{shards}/mifa-000002.parquet"])
    fs.pipe(f"{shards}/mifa-000002.tar", b"garbage")
    fs.pipe(f"{shards}/.tmp-mifa-000002.tar.deadbeef", b"partial")
    bucket, _, key = f"{shards}/mifa-000002.parquet".partition("/")
    mpu = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    fs.call_s3("upload_part", Bucket=bucket, Key=key, PartNumber=1, UploadId=mpu["UploadId"], Body=b"x" * 100)
    assert _uploads(fs, PREFIX) == [key]
    v = factory("verify", URL, env=env)
    assert v.returncode == 1 and "BAD mifa-000002: not committed" in v.stdout

    p = factory("resume", URL, *SMALL_RAY, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "4/4 shards" in p.stderr and "(3 shards were already done)" in p.stderr
    assert _uploads(fs, PREFIX) == []
    assert not [k for k in fs.find(PREFIX) if posixpath.basename(k).startswith(".tmp-")]
    assert {n: fs.cat(f"{shards}/{n}.tar") for n in SHARDS} == tars  # redone byte for byte
    after = {n: fs.cat(f"{shards}/{n}.stats.json") for n in SHARDS}
    assert {n for n in SHARDS if after[n] != markers[n]} == {"mifa-000002"}  # only shard 2 was redone
    factory("verify", URL, env=env, check=True)


def test_missing_bucket_is_a_clear_error(s3_env):
    env, _ = s3_env
    p = factory("build", "--out", "s3://no-such-bucket/mifa", *ARGS, env=env)
    assert p.returncode == 2
    assert "bucket 'no-such-bucket' does not exist" in p.stderr and "aws s3 mb" in p.stderr


def _writer(layout: Layout, name: str, n: int = 2, side: int = 8) -> ShardWriter:
    w = ShardWriter(layout, name)
    rng = np.random.default_rng(0)
    for i in range(n):
        key = f"{name}-{i:07d}"
        img = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
        w.write(key, img, {"key": key}, au_array(np.zeros(12, bool), np.zeros(12)), {"key": key})
    return w


def test_writer_on_s3_publishes_nothing_until_complete(s3_env, monkeypatch):
    """In-process: an upload in flight is invisible, abort discards it, a short upload blocks the marker."""
    env, fs = s3_env
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    fs.mkdir(f"{BUCKET}-unit")
    layout = Layout(f"s3://{BUCKET}-unit/out")
    assert layout.is_object_store
    layout.makedirs()
    monkeypatch.setattr(layout.fs, "default_block_size", 5 * 2**20)  # S3's smallest part: a multipart upload

    w = _writer(layout, "mifa-000000", n=2, side=1100)  # ~7 MB of random PNG
    tar_key = layout.tar("mifa-000000")
    assert _uploads(fs, tar_key) == [tar_key.split("/", 1)[1]]
    assert not fs.exists(tar_key)  # a part is uploaded, but no object exists until completion
    w.abort()
    assert _uploads(fs, tar_key) == [] and not fs.exists(tar_key)

    w = _writer(layout, "mifa-000001")
    real_info = layout.fs.info
    monkeypatch.setattr(layout.fs, "info", lambda p, **kw: {**real_info(p, **kw), "size": 1})
    with pytest.raises(OSError, match="incomplete"):
        w.commit({"build_id": "b", "name": "mifa-000001"})
    monkeypatch.setattr(layout.fs, "info", real_info)
    assert not fs.exists(layout.stats("mifa-000001")) and not fs.exists(layout.parquet("mifa-000001"))
    assert scan(layout, "b").committed == {}
    assert clean_uncommitted(layout, {}) == [layout.tar("mifa-000001")]

    steps: list[str] = []
    real_pipe, real_check = layout.fs.pipe_file, layout.check_uploaded
    monkeypatch.setattr(layout.fs, "pipe_file", lambda p, d, **kw: (steps.append("put " + p), real_pipe(p, d, **kw)))
    monkeypatch.setattr(layout, "check_uploaded", lambda p, n: (steps.append("check " + p), real_check(p, n)))
    stats = _writer(layout, "mifa-000001").commit({"build_id": "b", "name": "mifa-000001"})
    paths = [layout.tar("mifa-000001"), layout.parquet("mifa-000001"), layout.stats("mifa-000001")]
    # tar complete, then parquet put and checked, then the marker: never a marker before its data
    assert steps == [f"check {paths[0]}"] + [f"{s} {p}" for p in paths[1:] for s in ("put", "check")]
    assert scan(layout, "b").committed["mifa-000001"]["files"] == stats["files"]
    assert _listing(fs, layout.shards_dir) == ["mifa-000001.parquet", "mifa-000001.stats.json", "mifa-000001.tar"]


@pytest.fixture
def flaky_s3(s3_env):
    """The moto server behind S3FaultProxy: (env whose AWS_ENDPOINT_URL is the proxy, client, proxy)."""
    from s3_fault_proxy import S3FaultProxy

    env, fs = s3_env
    # s3fs caches filesystems by their arguments, not by the AWS_ENDPOINT_URL they read: one made
    # earlier in this process would bypass the proxy, and one made here would outlive it
    type(fs).clear_instance_cache()
    with S3FaultProxy(env["AWS_ENDPOINT_URL"]) as proxy:
        yield {**env, "AWS_ENDPOINT_URL": proxy.url}, fs, proxy
    type(fs).clear_instance_cache()


def test_transient_s3_errors_during_a_multipart_upload_are_retried_and_counted(flaky_s3, monkeypatch):
    """503 SlowDown on a part, 500 on the completion, a reset connection twice on the parquet PUT:
    each request is retried with backoff, the shard commits whole, and its stats count 3 retries.
    (aiohttp re-sends an idempotent request at once, uncounted, when the store resets a reused
    connection; botocore retries the second reset, counted.)"""
    env, fs, proxy = flaky_s3
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    fs.mkdir(f"{BUCKET}-flaky")
    layout = Layout(f"s3://{BUCKET}-flaky/out")
    layout.makedirs()
    monkeypatch.setattr(layout.fs, "default_block_size", 5 * 2**20)  # S3's smallest part: a multipart upload
    proxy.push("slowdown", "partNumber=1")
    proxy.push("error_500", "mifa-000000.tar?uploadId=")  # CompleteMultipartUpload
    proxy.push("reset", "mifa-000000.parquet")
    proxy.push("reset", "mifa-000000.parquet")
    stats = _writer(layout, "mifa-000000", n=2, side=1100).commit({"build_id": "b", "name": "mifa-000000"})
    assert [f for f, _, _ in proxy.faults] == ["slowdown", "error_500", "reset", "reset"] and not proxy.script
    assert stats["store_retries"] == 3
    assert hashlib.sha256(fs.cat(layout.tar("mifa-000000"))).hexdigest() == stats["files"]["tar"]["sha256"]
    assert scan(layout, "b").committed["mifa-000000"]["store_retries"] == 3
    assert _uploads(fs, f"{BUCKET}-flaky/out") == []


@pytest.mark.slow  # the default suite stays under 15 min; `bash tests/run.sh -m slow` runs it
def test_a_build_to_flaky_s3_completes_and_reports_its_retries(flaky_s3):
    """`factory build` to S3 through the faulty proxy: the shard workers retry too (their Layout
    carries the retry config), the build exits 0, verifies, and `report` sums the retries."""
    env, fs, proxy = flaky_s3
    fs.mkdir(f"{BUCKET}-flaky2")
    url = f"s3://{BUCKET}-flaky2/mifa"
    proxy.push("slowdown", "mifa-000000.tar")
    proxy.push("error_500", "mifa-000001.parquet")
    proxy.push("slowdown", "mifa-000001.tar")
    p = factory("build", "--out", url, "--target", "20", "--shard-size", "10", *FAST, "--set", "build.shard_retries=0",
                env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(proxy.faults) == 3 and not proxy.script
    markers = [json.loads(fs.cat(f"{BUCKET}-flaky2/mifa/shards/mifa-00000{i}.stats.json")) for i in range(2)]
    assert [m["store_retries"] for m in markers] == [1, 2] and all(m["attempt"] == 1 for m in markers)
    v = factory("verify", url, env=env)
    assert v.returncode == 0 and "2/2 shards verified, 20 samples" in v.stdout, v.stdout + v.stderr[-2000:]
    rep = json.loads(factory("report", url, "--json", env=env, check=True).stdout)
    assert rep["storage"]["store_retries"] == 3
    assert "; 3 store requests retried" in factory("report", url, env=env, check=True).stdout
