"""`factory report s3://...`: a small build copied to a local S3 server (moto) reports as it does on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAST, factory

BUCKET = "mifa-test"


@pytest.fixture(scope="module")
def bucket(s3_env):
    env, fs = s3_env
    fs.mkdir(BUCKET)
    return s3_env


@pytest.fixture(scope="module")
def local_build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("s3src") / "out"
    args = ["--target", "30", "--shard-size", "10", "--out", str(out), *FAST]
    factory("build", *args, check=True)
    return out


def test_report_on_s3_matches_local(local_build, bucket):
    env, fs = bucket
    fs.put(str(local_build) + "/", f"{BUCKET}/mifa/", recursive=True)
    # a shard still being written on the cluster: no marker yet, so it must not be counted
    fs.pipe(f"{BUCKET}/mifa/shards/.tmp-mifa-000003.tar.abc", b"partial")
    assert fs.exists(f"{BUCKET}/mifa/build.json")

    url = f"s3://{BUCKET}/mifa"
    html = f"s3://{BUCKET}/reports/report.html"
    p = factory("report", url, "--json", "--html", html, "--samples", "4", env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    remote = json.loads(p.stdout)
    local = json.loads(factory("report", str(local_build), "--json", "--samples", "4", check=True).stdout)

    assert remote["shards"] == local["shards"] == {"total": 3, "done": 3, "failed": 0, "pending": 0}
    assert remote["figures"] == local["figures"]
    assert [s["key"] for s in remote["samples"]["accepted"]] == [s["key"] for s in local["samples"]["accepted"]]
    assert [s["key"] for s in remote["samples"]["rejected"]] == [s["key"] for s in local["samples"]["rejected"]]
    kept = [s for s in remote["samples"]["rejected"] if s.get("image")]  # read from s3://.../rejected/
    assert kept
    page = fs.cat(f"{BUCKET}/reports/report.html").decode()
    assert page.count("<img ") == 7 + 4 + len(kept) and 'id="samples-accepted"' in page

    p = factory("report", f"s3://{BUCKET}/missing", env=env)
    assert p.returncode == 2 and "no build.json" in p.stderr
