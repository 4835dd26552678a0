"""`factory build` end to end on embedded Ray: exact shards, readback, resume, failures, verify, report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from conftest import FAST, ROOT, SMALL_RAY, factory
from core.facs import NUM_AUS


def _names(out: Path, suffix: str) -> list[str]:
    return sorted(p.name for p in (out / "shards").glob(f"*{suffix}"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_ray) -> Path:
    """One real 2000-sample build shared by the read-back, verify and report tests."""
    out = tmp_path_factory.mktemp("build") / "out"
    factory("build", "--target", "2000", "--shard-size", "250", "--out", str(out), *FAST, env=shared_ray, check=True)
    return out


def test_build_reads_back_with_webdataset_and_pyarrow(corpus):
    tars = _names(corpus, ".tar")
    assert len(tars) == 8 and len(_names(corpus, ".stats.json")) == 8
    ds = wds.WebDataset([str(corpus / "shards" / t) for t in tars], shardshuffle=False).decode("rgb8")
    keys, per_shard = [], {}
    for s in ds:
        img, meta, au = s["png"], s["json"], s["au.npy"]
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert meta["key"] == s["__key__"] and len(meta["labels"]["intensity"]) == NUM_AUS
        assert au.shape == (2, NUM_AUS) and np.array_equal(au[0], meta["labels"]["occurrence"])
        assert meta["prompt"] and meta["expander"] == "grammar" and "skin_group" in meta["identity"]
        keys.append(s["__key__"])
        per_shard[meta["shard"]] = per_shard.get(meta["shard"], 0) + 1
    assert len(keys) == 2000 and len(set(keys)) == 2000
    assert per_shard == {i: 250 for i in range(8)}
    table = pq.read_table([str(corpus / "shards" / p) for p in _names(corpus, ".parquet")])
    assert table.num_rows == 2000
    assert sorted(table.column("key").to_pylist()) == sorted(keys)
    assert not list(corpus.rglob(".tmp-*"))


def test_verify_passes_then_catches_each_corruption_by_name(corpus, tmp_path):
    ok = factory("verify", str(corpus))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "8/8 shards verified, 2000 samples" in ok.stdout

    bad = tmp_path / "bad"
    shutil.copytree(corpus, bad)
    flipped = bad / "shards" / "mifa-000001.tar"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated = bad / "shards" / "mifa-000003.tar"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (bad / "shards" / "mifa-000005.parquet").unlink()

    p = factory("verify", str(bad))
    assert p.returncode == 1
    bad_lines = [ln for ln in p.stdout.splitlines() if ln.startswith("BAD ")]
    assert {ln.split()[1].rstrip(":") for ln in bad_lines} == {"mifa-000001", "mifa-000003", "mifa-000005"}
    assert any("mifa-000001: tar checksum mismatch" in ln for ln in bad_lines)
    assert any("mifa-000003: tar" in ln for ln in bad_lines)
    assert any("mifa-000005: parquet missing" in ln for ln in bad_lines)
    assert "5/8 shards verified" in p.stdout


def test_report_json_and_terminal(corpus):
    p = factory("report", str(corpus), "--json", check=True)
    rep = json.loads(p.stdout)
    assert rep["accepted"] == 2000 and rep["shards"] == {"total": 8, "done": 8, "failed": 0, "pending": 0}
    assert rep["funnel"]["accepted"] == 2000 and rep["candidates"] >= 2000
    assert sum(v["accepted"] for v in rep["balance"]["emotions"].values()) == 2000
    for a in rep["aus"]:  # the puppet renders its target exactly
        assert a["occurrence"] == pytest.approx(a["target_occurrence"])
    assert rep["throughput"]["samples_per_s"] > 0
    # identity leakage: the puppet renderer has no training subjects; the report says so, and why
    why = "generator=puppet is no trained model, so it has no training subjects"
    assert rep["training_similarity"]["measured"] is False and rep["training_similarity"]["why"] == why
    t = factory("report", str(corpus), check=True)
    assert "accepted 2000/2000" in t.stdout and "AU26" in t.stdout
    assert f"training similarity (identity leakage): not measured: {why}" in t.stdout
    parquets = [str(p) for p in sorted((corpus / "shards").glob("*.parquet"))]
    table = pq.read_table(parquets, columns=["training_similarity"])
    assert table.column(0).null_count == 2000  # a null column where it is not measured


def test_build_again_is_a_noop_and_other_config_is_refused(corpus):
    before = {p.name: p.stat().st_mtime_ns for p in (corpus / "shards").iterdir()}
    p = factory("build", "--target", "2000", "--shard-size", "250", "--out", str(corpus), *FAST, check=True)
    assert "8 shards were already done" in p.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (corpus / "shards").iterdir()} == before
    p = factory("build", "--target", "2000", "--shard-size", "200", "--out", str(corpus), *FAST)
    assert p.returncode == 2 and "another config" in p.stderr and '"shard_size": 250' in p.stderr


def test_forced_failure_lands_in_failed_and_resume_completes(shared_ray, tmp_path):
    out = tmp_path / "out"
    args = ["--target", "300", "--shard-size", "100", "--out", str(out), *FAST, "--set", "build.shard_retries=1"]
    p = factory("build", *args, env={**shared_ray, "MIFA_FAULTS": "write:1"})
    assert p.returncode == 1, p.stderr
    rec = json.loads((out / "failed" / "mifa-000001.json").read_text())
    assert rec["attempts"] == 2 and "InjectedFault" in rec["error"]
    assert "FAILED mifa-000001" in p.stderr
    assert _names(out, ".stats.json") == ["mifa-000000.stats.json", "mifa-000002.stats.json"]
    assert not list(out.rglob(".tmp-*"))
    rep = json.loads(factory("report", str(out), "--json", check=True).stdout)
    assert rep["shards"]["failed"] == 1 and "mifa-000001" in rep["failed"]

    p = factory("resume", str(out), *SMALL_RAY, env=shared_ray)
    assert p.returncode == 0, p.stderr
    assert not (out / "failed" / "mifa-000001.json").exists()
    factory("verify", str(out), check=True)


@pytest.mark.slow  # the default suite stays under 15 min; `bash tests/run.sh -m slow` runs it
def test_a_shard_out_of_candidates_fails_at_once_and_a_resume_may_raise_the_budget(tmp_path):
    """Running out of build.max_oversample is not retried (a re-run would draw the same candidates);
    `factory resume --set build.max_oversample=N` finishes it without touching the committed shards."""
    out = tmp_path / "out"
    env = {"MIFA_INJECT": "blank:0.3"}  # about 70 % of candidates can pass: 1 x the shard size is too few
    args = ["--target", "40", "--shard-size", "20", "--out", str(out), *FAST, "--set", "build.max_oversample=1"]
    p = factory("build", *args, env=env)
    assert p.returncode == 1, p.stderr
    failed = sorted((out / "failed").glob("*.json"))
    assert failed and "retrying" not in p.stderr, p.stderr[-3000:]
    for f in failed:
        rec = json.loads(f.read_text())
        assert rec["attempts"] == 1 and rec["type"] == "QuotaExhaustedError", rec
        assert "factory resume OUT --set build.max_oversample=N" in rec["error"]
    done = {n: (out / "shards" / n).read_bytes() for n in _names(out, ".tar")}
    p = factory("resume", str(out), "--set", "build.max_oversample=4", *SMALL_RAY, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not list((out / "failed").glob("*.json")) and len(_names(out, ".stats.json")) == 2
    assert all((out / "shards" / n).read_bytes() == b for n, b in done.items())
    factory("verify", str(out), check=True)
    p = factory("resume", str(out), "--set", "build.seed=3", env=env)
    assert p.returncode == 2 and "build.seed" in p.stderr and "build.max_oversample" in p.stderr


def _ray_pids_of(session_pgid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,pgid,cmd"], capture_output=True, text=True).stdout.splitlines()[1:]
    return [int(ln.split()[0]) for ln in out if int(ln.split()[1]) == session_pgid]


@pytest.mark.slow  # the default suite stays under 15 min; `bash tests/run.sh -m slow` runs it
def test_sigkill_mid_build_then_resume_is_byte_identical(tmp_path):
    args = ["--target", "600", "--shard-size", "50", *FAST]
    ref = tmp_path / "ref"
    factory("build", *args, "--out", str(ref), check=True)

    out = tmp_path / "killed"
    env = dict(os.environ)
    env.pop("MIFA_FAULTS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "factory.cli", "build", *args, "--out", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the driver and the Ray it started
    )
    deadline = time.time() + 300
    seen = False
    while time.time() < deadline and proc.poll() is None:
        shards = out / "shards"
        committed = list(shards.glob("*.stats.json")) if shards.exists() else []
        writing = list(shards.glob(".tmp-*.tar.*")) if shards.exists() else []
        if committed and writing and len(committed) < 12:
            seen = True
            break
        time.sleep(0.01)
    assert seen, "never saw a committed shard beside one being written"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)
    for pid in _ray_pids_of(proc.pid):  # anything of that group that outlived the kill
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # it exited between the listing and the kill
            pass
    assert len(list((out / "shards").glob("*.stats.json"))) < 12

    p = factory("build", *args, "--out", str(out))
    assert p.returncode == 0, p.stderr
    for suffix in (".tar", ".parquet"):
        names = _names(ref, suffix)
        assert names == _names(out, suffix) and len(names) == 12
        for n in names:
            assert (ref / "shards" / n).read_bytes() == (out / "shards" / n).read_bytes(), n
    assert not list(out.rglob(".tmp-*"))
    factory("verify", str(out), check=True)
