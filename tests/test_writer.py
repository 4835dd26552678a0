"""Shard writer: reproducible tars, marker written last, nothing half-written on failure."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds

from factory.layout import Layout
from factory.manifest import clean_uncommitted, scan
from factory.writer import ShardWriter, au_array, encode_image


def _write(out, name="mifa-000000", n=3, fmt="png"):
    layout = Layout(str(out))
    layout.makedirs()
    w = ShardWriter(layout, name, image_format=fmt)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        key = f"{name}-{i:07d}"
        occ, inten = np.zeros(12, bool), np.arange(12) % 6
        w.write(key, img, {"key": key}, au_array(occ, inten), {"key": key})
    return layout, w


def test_commit_is_reproducible_and_marker_last(tmp_path, monkeypatch):
    layout, w = _write(tmp_path / "a")
    order = []
    real_mv = layout.fs.mv
    monkeypatch.setattr(layout.fs, "mv", lambda a, b, **k: (order.append(b.rsplit("/", 1)[1]), real_mv(a, b, **k)))
    stats = w.commit({"build_id": "x", "name": "mifa-000000"})
    assert order == ["mifa-000000.tar", "mifa-000000.parquet", "mifa-000000.stats.json"]
    assert stats["samples"] == 3 and stats["committed"]
    layout_b, w2 = _write(tmp_path / "b")
    w2.commit({"build_id": "x", "name": "mifa-000000"})
    a = (tmp_path / "a" / "shards" / "mifa-000000.tar").read_bytes()
    assert a == (tmp_path / "b" / "shards" / "mifa-000000.tar").read_bytes()
    import hashlib

    assert hashlib.sha256(a).hexdigest() == stats["files"]["tar"]["sha256"]
    s = next(iter(wds.WebDataset(str(tmp_path / "a" / "shards" / "mifa-000000.tar"), shardshuffle=False)))
    au = np.load(io.BytesIO(s["au.npy"]))
    assert au.shape == (2, 12) and au.dtype == np.float32 and au[1, 5] == 5
    assert json.loads(s["json"]) == {"key": "mifa-000000-0000000"}
    assert scan(Layout(str(tmp_path / "a")), "x").committed.keys() == {"mifa-000000"}


def test_abort_and_cleanup_leave_no_partial_files(tmp_path):
    layout, w = _write(tmp_path)
    assert list((tmp_path / "shards").glob(".tmp-*"))
    w.abort()
    assert not list((tmp_path / "shards").iterdir())
    # a crash between tar rename and marker: the resume cleanup removes the unmarked tar
    layout, w = _write(tmp_path, name="mifa-000001")
    (tmp_path / "shards" / "mifa-000001.tar").write_bytes(b"partial")
    (tmp_path / "shards" / "mifa-000001.stats.json").write_text("{not json")
    state = scan(layout, "x")
    assert state.committed == {}
    removed = clean_uncommitted(layout, state.committed)
    assert len(removed) == 3 and not list((tmp_path / "shards").iterdir())


def test_duplicate_key_and_bad_format_are_errors(tmp_path):
    layout, w = _write(tmp_path, n=1)
    with pytest.raises(ValueError, match="duplicate key"):
        w.write("mifa-000000-0000000", np.zeros((8, 8, 3), np.uint8), {}, b"", {})
    w.abort()
    with pytest.raises(ValueError, match="use png or jpg"):
        encode_image(np.zeros((8, 8, 3), np.uint8), "gif")
    assert encode_image(np.zeros((8, 8, 3), np.uint8), "jpg")[:2] == b"\xff\xd8"


def test_kept_rejected_samples_go_outside_the_corpus_before_the_marker(tmp_path, monkeypatch):
    import hashlib

    layout, w = _write(tmp_path)
    img = np.full((8, 8, 3), 7, np.uint8)
    w.keep_rejected("mifa-000000-0000009", {"key": "mifa-000000-0000009", "reason": "realism"}, img)
    w.keep_rejected("mifa-000000-0000010", {"key": "mifa-000000-0000010", "reason": "prompt_target_jaccard"}, None)
    order = []
    real_mv = layout.fs.mv
    monkeypatch.setattr(layout.fs, "mv", lambda a, b, **k: (order.append(b.split("/")[-2:]), real_mv(a, b, **k)))
    stats = w.commit({"build_id": "x", "name": "mifa-000000"})
    assert order == [["shards", "mifa-000000.tar"], ["shards", "mifa-000000.parquet"],
                     ["rejected", "mifa-000000.tar"], ["shards", "mifa-000000.stats.json"]]  # fmt: skip
    data = (tmp_path / "rejected" / "mifa-000000.tar").read_bytes()
    assert stats["files"]["rejected"] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "samples": 2}
    got = list(wds.WebDataset(str(tmp_path / "rejected" / "mifa-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in got] == ["mifa-000000-0000009", "mifa-000000-0000010"]
    assert "png" in got[0] and "png" not in got[1] and json.loads(got[1]["json"])["reason"] == "prompt_target_jaccard"
    assert stats["samples"] == 3  # rejected ones are not samples of the shard
    # a crash after the rejected tar but before the marker: the resume cleanup removes it too
    (tmp_path / "shards" / "mifa-000000.stats.json").unlink()
    removed = clean_uncommitted(layout, scan(layout, "x").committed)
    assert str(tmp_path / "rejected" / "mifa-000000.tar") in removed and not list((tmp_path / "rejected").iterdir())


def test_verify_reads_every_sample_and_names_what_is_wrong():
    """Checks that hold under `python -O`: a NaN or misshapen label array, a json naming another key."""
    from core.facs import NUM_AUS
    from factory.verify import VerifyReport, _check_tar

    img = encode_image(np.zeros((8, 8, 3), np.uint8), "png", 95)

    def npy(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    good = np.zeros((2, NUM_AUS), np.float32)
    nan = good.copy()
    nan[1, 3] = np.nan
    rows = [
        ("mifa-000000-0", "mifa-000000-0", good),
        ("mifa-000000-1", "mifa-000000-1", nan),
        ("mifa-000000-2", "mifa-000000-2", np.zeros((NUM_AUS,), np.float32)),
        ("mifa-000000-3", "mifa-000000-9", good),
    ]
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False) as tw:
        for key, named, au in rows:
            tw.write({"__key__": key, "json": json.dumps({"key": named}).encode(), "au.npy": npy(au), "png": img})
    report = VerifyReport()
    keys = _check_tar("mifa-000000", buf.getvalue(), {}, report)
    assert keys == [k for k, _, _ in rows]
    problems = report.problems["mifa-000000"]
    assert len(problems) == 3, problems
    assert "mifa-000000-1: au.npy" in problems[0] and "finite" in problems[0]
    assert "mifa-000000-2: au.npy is (12,)" in problems[1]
    assert "mifa-000000-3: its json names key 'mifa-000000-9'" in problems[2]
