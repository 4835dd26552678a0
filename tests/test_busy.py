"""Busy accounting: seconds inside generate() / detect(), calls and images per actor, and the
fraction of the build's shard window each generator and detector actor spent in them (issue 7)."""

from __future__ import annotations

import logging
from functools import partial

import numpy as np
import pytest

from factory.config import load_config
from factory.generators import GenerationBatch
from factory.actors import ActorBusy, GeneratorActor
from factory.graph import run_build
from factory.plan import Plan
from factory.sampler import ShardSampler

SMALL = ["generator=puppet", "runtime.num_cpus=2", "runtime.object_store_mb=100", "runtime.progress=false",
         "runtime.num_generators=2", "runtime.generator_cpus=0.5", "runtime.num_detectors=1"]  # fmt: skip


def test_actor_counts_calls_images_and_seconds():
    """The actor class itself (no Ray): every generate() call is counted, with its images and time."""
    cfg = load_config(None, ["generator=puppet", "build.target=20", "build.shard_size=20"])
    actor = GeneratorActor(cfg.model_dump(mode="json"))
    assert actor.calls == 0 and actor.busy_s == 0.0
    cands = ShardSampler(Plan(cfg).shard(0), cfg).draw()[:5]
    batch = GenerationBatch(
        keys=[c.key for c in cands],
        seeds=np.array([c.seed for c in cands], dtype=np.int64),
        prompts=["" for _ in cands],
        target=np.stack([c.intensity for c in cands]),
        identities=[c.identity for c in cands],
    )
    for _ in range(2):
        actor.generate(batch)
    assert actor.calls == 2 and actor.images == 2 * len(cands)
    assert actor.busy_s > 0 and actor.last_end >= actor.first_start


def test_build_reports_busy_fraction_per_actor(tmp_path, caplog, monkeypatch):
    """A real build on an embedded local Ray (stopped by run_build): one entry per generator and
    per detector actor. Progress polls the shards in flight (here at every loop turn)."""
    from factory import graph, progress

    cfg = load_config(None, ["build.target=120", "build.shard_size=20", *SMALL, "runtime.progress=true"])
    monkeypatch.setattr(graph, "BuildProgress", partial(progress.BuildProgress, live_every_s=0.0))
    with caplog.at_level(logging.INFO, logger="factory.progress"):
        summary = run_build(cfg, str(tmp_path / "out"))
    import ray

    polled = [r.getMessage() for r in caplog.records if " in flight)" in r.getMessage()]
    assert polled, [r.getMessage() for r in caplog.records]

    assert not ray.is_initialized()  # the build stopped the Ray it started
    assert summary.ok and summary.accepted == 120
    assert summary.shards_seconds > 0 and len(summary.generators) == 2
    assert [g.actor for g in summary.generators] == [0, 1]
    assert [(d.stage, d.actor) for d in summary.detectors] == [("detector", 0)]
    for g in [*summary.generators, *summary.detectors]:
        print(g.describe())
        assert isinstance(g, ActorBusy)
        assert g.calls > 0 and g.images >= g.calls and g.busy_s > 0
        assert 0 < g.fraction <= 1 and g.busy_s <= g.active_s + 1e-6 <= summary.shards_seconds + 1e-3
        assert g.fraction == pytest.approx(g.busy_s / summary.shards_seconds)
    generated = sum(g.images for g in summary.generators)
    assert generated >= summary.candidates >= 120
    # every valid generated image is detected once (the puppet makes no invalid ones)
    assert summary.detectors[0].images == generated
    assert [g.threads for g in summary.generators] == [1, 1] and summary.detectors[0].threads == 1
    assert summary.sizing is not None and summary.sizing.generators == 2
    busy_lines = [r.getMessage() for r in caplog.records if " busy " in r.getMessage()]
    assert [ln.split(" busy ")[0] for ln in busy_lines] == ["generator 0", "generator 1", "detector 0"]


def test_the_progress_log_line_gives_the_time_left(caplog, monkeypatch):
    """Without a terminal (`ray job submit`, CI) the log line carries the ETA that the rich bar shows."""
    from factory import progress

    now = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: now[0])
    p = progress.BuildProgress(target=1000, num_shards=4)
    p.start(accepted=100, shards=0)  # a resume: 100 already on disk
    with caplog.at_level(logging.INFO, logger="factory.progress"):
        p.tick(force=True)
        now[0] += 60.0
        p.shard_done(samples=300, candidates=400, rejected={"realism": 100})
    first, second = [r.getMessage() for r in caplog.records]
    assert "accepted 100/1000" in first and "ETA -" in first  # nothing accepted this run yet: no rate
    # 300 in 60 s is 5/s; 600 left -> 120 s
    assert "accepted 400/1000" in second and "5.0/s" in second and "ETA 0:02:00" in second, second
    assert "rejected: realism=100" in second


def test_a_shard_reports_its_counts_after_every_round(tmp_path):
    """What a shard worker's live() answers: (accepted, candidates) after each round, ending at the
    commit's counts (no Ray: the generator actor class is called in-process)."""
    from factory.layout import Layout
    from factory.shard import run_shard

    cfg = load_config(None, ["generator=puppet", "build.target=40", "build.shard_size=40", "plan.candidate_batch=8",
                             "detect.enabled=false"])  # fmt: skip
    actor = GeneratorActor(cfg.model_dump(mode="json"))
    rounds: list[tuple[int, int]] = []
    expand: list[dict] = []  # the expander's stats so far, for the driver's fallback rule
    Layout(str(tmp_path)).makedirs()
    stats = run_shard(
        cfg, 0, str(tmp_path), actor.generate, "b0", on_round=lambda a, c, e: (rounds.append((a, c)), expand.append(e))
    )
    assert len(rounds) >= 5 and rounds == sorted(rounds)
    assert all(0 < c - prev_c <= 8 for (_, c), (_, prev_c) in zip(rounds[1:], rounds))
    assert rounds[-1] == (stats["samples"], stats["candidates"]) == (40, stats["candidates"])
    assert expand[-1] == stats["expand"] and expand[-1]["requests"] == stats["candidates"]


def test_the_progress_counts_shards_in_flight_until_they_commit(caplog, monkeypatch):
    from factory import progress

    now = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: now[0])
    p = progress.BuildProgress(target=1000, num_shards=4, live_every_s=5.0)
    p.start(accepted=0, shards=0)
    now[0] += 100.0
    assert p.live_due()
    p.live({0: (60, 500), 1: (40, 400)})
    assert not p.live_due()
    with caplog.at_level(logging.INFO, logger="factory.progress"):
        p.tick(force=True)
        now[0] += 5.0
        p.live({1: (50, 450)})  # shard 0 did not answer: it keeps its last counts
        p.shard_done(samples=250, candidates=2000, rejected={"realism": 1750}, index=0)
        now[0] += 5.0
        p.shard_retried(1)  # shard 1 failed and starts over: what it had is gone
        p.tick(force=True)
    first, second, third = [r.getMessage() for r in caplog.records]
    # 100 accepted in 100 s: 1/s, 900 left
    assert "accepted 0/1000" in first and "(100 accepted in 2 in flight)" in first and "1.0/s" in first, first
    assert "kept 11% of candidates" in first and "ETA 0:15:00" in first, first
    assert "accepted 250/1000" in second and "(50 accepted in 1 in flight)" in second, second
    assert "accepted 250/1000" in third and "in flight" not in third and "2.3/s" in third, third
