"""`factory report`: the HTML in headless Chromium, the JSON figures against the parquets, a running
build, and bad input. One small build (3 shards, one forced to fail, some samples spoiled) serves all."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import FAST, factory

from core.facs import NUM_AUS
from factory.report_html import SECTIONS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PLOTS = 7  # funnel, rejections, AU occurrence, AU intensity, co-occurrence, balance, throughput


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_ray) -> Path:
    """3 shards of 20: shard 2 fails at write (so the build is partial), 10% of samples are blanked."""
    out = tmp_path_factory.mktemp("report") / "out"
    args = ["--target", "60", "--shard-size", "20", "--out", str(out), *FAST]
    p = factory(
        "build", *args, "--set", "build.shard_retries=0",
        env={**shared_ray, "MIFA_FAULTS": "write:2", "MIFA_INJECT": "blank:0.1"},
    )  # fmt: skip
    assert p.returncode == 1, p.stderr[-3000:]  # exit 1: one shard failed, the rest committed
    assert (out / "failed" / "mifa-000002.json").exists()
    return out


def _report_json(out: Path | str, *extra: str) -> dict:
    return json.loads(factory("report", str(out), "--json", *extra, check=True).stdout)


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH (.ci/run installs Debian's chromium)")
def test_html_renders_every_section_and_image_in_chromium(corpus, tmp_path):
    html = tmp_path / "report.html"
    p = factory("report", str(corpus), "--html", str(html), "--samples", "8", "--json", check=True)
    assert f"wrote {html}" in p.stderr
    rep = json.loads(p.stdout)
    assert rep["accepted"] == 40 and rep["target"] == 60
    text = html.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), "the report must not load external URLs"
    n_img = text.count("<img ")
    # rejected cards show their kept image: blank ones were generated, so they have one
    rejected_images = [s for s in rep["samples"]["rejected"] if s.get("image")]
    assert any(s["reason"] == "invalid_image" for s in rejected_images)
    assert n_img == PLOTS + 8 + len(rejected_images)  # every plot, an image per accepted card and kept rejection

    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", html.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stdout[:2000]
    total = re.search(r'data-images-total="(\d+)"', body.group(1))
    ok = re.search(r'data-images-ok="(\d+)"', body.group(1))
    assert total and ok, f"the load script did not run: {body.group(0)}"
    assert int(total.group(1)) == n_img and int(ok.group(1)) == n_img, body.group(0)  # all decoded
    for sid, title in SECTIONS:
        assert f'id="{sid}"' in dom.stdout and title in dom.stdout, sid
    assert "mifa-000002" in dom.stdout and "InjectedFault" in dom.stdout  # failed shard with its error
    assert "invalid_image" in dom.stdout and "blank" in dom.stdout  # a rejected card with its injected fault

    shot = tmp_path / "report.png"
    r = _chromium(f"--screenshot={shot}", "--window-size=1400,4000", html.as_uri())
    assert r.returncode == 0 and shot.stat().st_size > 50_000, r.stderr[-2000:]


def test_json_figures_agree_with_the_parquets(corpus):
    rep = _report_json(corpus, "--samples", "6", "--rejected", "3")
    assert rep["shards"] == {"total": 3, "done": 2, "failed": 1, "pending": 0}
    assert "InjectedFault" in rep["failed"]["mifa-000002"]
    table = pq.read_table([str(p) for p in sorted((corpus / "shards").glob("*.parquet"))])
    assert table.num_rows == rep["accepted"] == 40
    occ = np.array(table.column("occurrence").to_pylist(), dtype=np.int64)
    inten = np.rint(np.array(table.column("intensity").to_pylist())).astype(int)
    f = rep["figures"]
    assert f["au_occurrence"]["rows"] == 40
    assert np.allclose(f["au_occurrence"]["observed"], occ.mean(0))
    assert np.array_equal(f["cooccurrence"]["counts"], occ.T @ occ)
    hist = np.array(f["au_intensity"]["labels"])
    assert hist.shape == (NUM_AUS, 6)
    for i in range(NUM_AUS):
        assert np.array_equal(hist[i], np.bincount(inten[:, i], minlength=6))
    emo = table.column("emotion").to_pylist()
    bal = f["balance"]
    for e, row in zip(bal["emotions"], bal["age_groups"]["accepted"]):
        assert sum(row) == emo.count(e)
    assert np.sum(bal["skin_groups"]["planned"]) == 60  # the plan covers the whole corpus
    assert f["funnel"]["stages"][0] == "candidates" and f["funnel"]["counts"][-1] == 40
    assert sum(f["rejections"]["counts"]) == sum(rep["rejected"].values()) > 0
    assert sum(p[-1][1] for p in f["throughput"]["nodes"].values()) == 40

    keys = set(table.column("key").to_pylist())
    acc = rep["samples"]["accepted"]
    assert len(acc) == 6 and all(s["key"] in keys and s["prompt"] for s in acc)
    assert {s["shard"] for s in acc} == {"mifa-000000", "mifa-000001"}
    rej = rep["samples"]["rejected"]
    assert rej and all(s["key"] not in keys for s in rej)
    assert any(s["reason"] == "invalid_image" and "blank" in s["injected"] for s in rej)
    # kept rejected candidates are whole: prompt, identity and (once generated) the labels
    assert all(s["prompt"] and s["emotion"] for s in rej)
    assert all((corpus / "rejected" / f"{s['shard']}.tar").is_file() for s in rej)
    with tarfile.open(corpus / "rejected" / "mifa-000000.tar") as tf:
        metas = [json.load(tf.extractfile(m)) for m in tf if m.name.endswith(".json")]
        pngs = {m.name.split(".")[0] for m in tf if m.name.endswith(".png")}
    stats = json.loads((corpus / "shards" / "mifa-000000.stats.json").read_text())
    assert len(metas) == stats["files"]["rejected"]["samples"] > 0
    for m in metas:  # every one generated (the grammar prompts all pass): labels and image kept
        assert m["key"] in stats["rejected_examples"][m["reason"]] and m["key"] in pngs
        assert len(m["labels"]["intensity"]) == NUM_AUS and m["prompt"]
    # without --html no image is read: the card says where the stored one is, not "not generated"
    shown = [s for s in rej if s["shard"] == "mifa-000000"]
    assert shown and all(s["no_image"].startswith("image in rejected/") for s in shown), shown
    assert not list((corpus / "shards").glob("*rejected*"))


def test_running_build_reads_only_committed_shards(corpus, tmp_path):
    out = tmp_path / "running"
    shutil.copytree(corpus, out)
    shards = out / "shards"
    # a shard mid-commit: tar and parquet there, no marker yet; plus a temporary file
    shutil.copy(shards / "mifa-000001.parquet", shards / "mifa-000002.parquet")
    shutil.copy(shards / "mifa-000001.tar", shards / "mifa-000002.tar")
    (shards / ".tmp-mifa-000002.stats.json.0123").write_text("{not json")
    shutil.rmtree(out / "failed")
    rep = _report_json(out)
    assert rep["shards"] == {"total": 3, "done": 2, "failed": 0, "pending": 1}
    assert rep["figures"]["au_occurrence"]["rows"] == rep["accepted"] == 40
    assert all(s["shard"] != "mifa-000002" for s in rep["samples"]["accepted"])
    t = factory("report", str(out), check=True)
    assert "accepted 40/60" in t.stdout and "pending 1" in t.stdout


def test_bad_input_names_the_file_and_the_fix(corpus, tmp_path):
    p = factory("report", str(tmp_path / "nowhere"))
    assert p.returncode == 2 and "no build.json" in p.stderr and "factory build" in p.stderr

    bad = tmp_path / "bad-stats"
    shutil.copytree(corpus, bad)
    marker = bad / "shards" / "mifa-000001.stats.json"
    marker.write_text(marker.read_text()[:40])
    p = factory("report", str(bad), "--json")
    assert p.returncode == 2 and str(marker) in p.stderr and "factory resume" in p.stderr, p.stderr

    marker.write_text(
        json.dumps(
            {k: v for k, v in json.loads((corpus / marker.relative_to(bad)).read_text()).items() if k != "funnel"}
        )
    )
    p = factory("report", str(bad))
    assert p.returncode == 2 and str(marker) in p.stderr and "funnel" in p.stderr, p.stderr

    bad = tmp_path / "bad-parquet"
    shutil.copytree(corpus, bad)
    pq_path = bad / "shards" / "mifa-000000.parquet"
    pq_path.write_bytes(b"PAR1 this is not a parquet")
    p = factory("report", str(bad))
    assert p.returncode == 2 and str(pq_path) in p.stderr and "factory verify" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr

    bad = tmp_path / "bad-build-json"
    shutil.copytree(corpus, bad)
    (bad / "build.json").write_text("{")
    for cmd in ("report", "verify", "resume", "eval"):
        p = factory(cmd, str(bad))
        assert p.returncode == 2 and "build.json" in p.stderr and "--new-build" in p.stderr, (cmd, p.stderr)
        assert "Traceback" not in p.stderr, (cmd, p.stderr)


def test_throughput_leaves_out_the_time_between_a_build_and_its_resume():
    """Build time is the union of the shards' [start, end]: two overlapping shards, then one more a day later."""
    from factory.report import _build_clock, _timeline

    day = 86_400.0
    stats = [
        {"timings": {"start": 100.0, "end": 110.0}, "samples": 5, "node": "n1"},
        {"timings": {"start": 105.0, "end": 120.0}, "samples": 5, "node": "n1"},
        {"timings": {"start": day, "end": day + 10.0}, "samples": 5, "node": "n1"},
    ]
    clock, total = _build_clock(stats)
    assert total == 30.0
    assert [clock(t) for t in (50.0, 100.0, 110.0, 120.0, 1000.0, day + 5.0)] == [0.0, 0.0, 10.0, 20.0, 20.0, 25.0]
    assert [p for pts in _timeline(stats, clock).values() for p in pts] == [[10.0, 5], [20.0, 10], [30.0, 15]]
