"""Plan and sampler: exact shard sizes, balanced quotas, adaptive draws, the oversample guard."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from core.facs import EMOTION_NAMES, occurrence
from factory.config import load_config
from factory.plan import GRID, Plan
from factory.sampler import QuotaExhaustedError, ShardSampler


def test_shard_sizes_and_quotas():
    plan = Plan(load_config(None, ["build.target=2010", "build.shard_size=250"]))
    assert plan.num_shards == 9
    sizes = [s.size for s in plan.shards()]
    assert sizes == [250] * 8 + [10]
    for s in plan.shards():
        assert s.quotas.sum() == s.size and (s.quotas >= 0).all()
    assert len({s.seed for s in plan.shards()}) == 9
    assert [s.name for s in plan.shards()][:2] == ["mifa-000000", "mifa-000001"]


def test_quotas_follow_weights_at_every_scale():
    cfg = load_config(None, ["build.target=100000", "build.shard_size=400", "plan.emotions={happiness: 3, sadness: 1}"])
    plan = Plan(cfg)
    totals = plan.totals()
    emo = np.bincount(GRID.emotion_of(np.arange(GRID.size)), weights=totals)
    happy, sad = emo[EMOTION_NAMES.index("happiness")], emo[EMOTION_NAMES.index("sadness")]
    assert happy + sad == 100000 and abs(happy / 100000 - 0.75) < 0.001
    assert emo.sum() == happy + sad  # zero weight -> zero quota
    # one shard is balanced too (low-discrepancy positions, not iid draws)
    q = plan.shard(17).quotas
    e = np.bincount(GRID.emotion_of(np.arange(GRID.size)), weights=q)
    assert abs(e[EMOTION_NAMES.index("happiness")] - 300) <= 3
    skin = np.bincount(GRID.skin_of(np.arange(GRID.size)), weights=q)
    assert skin.max() - skin.min() <= 4


def _fill(sampler: ShardSampler, accept) -> tuple[np.ndarray, list]:
    kept = []
    while not sampler.done:
        cands = sampler.draw()
        passed = np.array([accept(c) for c in cands])
        keep = sampler.record(cands, passed)
        kept += [c for c, k in zip(cands, keep) if k]
    return sampler.accepted, kept


def test_sampler_fills_quotas_exactly_and_adapts_to_rejection():
    cfg = load_config(None, ["build.target=400", "build.shard_size=400", "build.max_oversample=10"])
    spec = Plan(cfg).shard(0)
    rng = np.random.default_rng(0)
    fear = EMOTION_NAMES.index("fear")
    # the checks reject 75% of fear samples and 10% of the rest
    accept = lambda c: rng.random() > (0.75 if c.emotion == "fear" else 0.10)  # noqa: E731
    sampler = ShardSampler(spec, cfg)
    accepted, kept = _fill(sampler, accept)
    assert (accepted == spec.quotas).all() and len(kept) == 400
    tried_e = np.bincount(GRID.emotion_of(np.arange(GRID.size)), weights=sampler.tried)
    quota_e = np.bincount(GRID.emotion_of(np.arange(GRID.size)), weights=spec.quotas)
    ratio = tried_e / np.maximum(quota_e, 1)
    others = np.delete(ratio, fear)
    assert ratio[fear] > 3.0 and others.max() < 1.4  # rejected strata drawn more often
    assert sampler.drawn < 1.5 * (quota_e[fear] * 4 + (400 - quota_e[fear]) / 0.9)


def test_candidate_stream_is_deterministic_and_targets_are_plausible():
    cfg = load_config(None, ["build.target=300", "build.shard_size=300"])
    spec = Plan(cfg).shard(0)
    a, b = ShardSampler(spec, cfg), ShardSampler(spec, cfg)
    ca, cb = a.draw(), b.draw()
    assert [c.key for c in ca] == [c.key for c in cb]
    assert all((x.intensity == y.intensity).all() and x.identity == y.identity for x, y in zip(ca, cb))
    _, kept = _fill(ShardSampler(spec, cfg), lambda c: True)
    for c in kept:
        assert c.intensity.min() >= 0 and c.intensity.max() <= 5
        occ = occurrence(c.intensity)
        if c.emotion == "happiness":
            assert occ[[4, 6]].all()  # AU6 and AU12 core
        if c.emotion == "neutral":
            assert not occ.any()
        assert c.identity.skin_group == GRID.cell(c.cell).skin_group
        assert c.identity.age_group == GRID.cell(c.cell).age_group


def test_oversample_guard_fails_with_clear_reason():
    cfg = load_config(None, ["build.target=100", "build.shard_size=100", "build.max_oversample=2"])
    sampler = ShardSampler(Plan(cfg).shard(0), cfg)
    with pytest.raises(QuotaExhaustedError, match=r"accepted \d+/100 after \d+ candidates.*max_oversample=2.0"):
        _fill(sampler, lambda c: c.emotion != "anger")
    # it gives up at the first round that would start past the budget; rounds are never cut short
    assert 200 <= sampler.drawn < 200 + cfg.plan.candidate_batch


def test_the_budget_never_changes_the_candidates_of_a_shard_that_fills():
    """Why a resume may raise build.max_oversample: the shard it lets finish draws exactly what it
    would have drawn under the larger budget from the start."""
    def accept(c):  # about 1 in 3, deterministic per candidate
        return c.seed % 3 == 0

    kept = {}
    for budget in ("2.88", "50"):
        cfg = load_config(None, ["build.target=200", "build.shard_size=200", f"build.max_oversample={budget}"])
        sampler = ShardSampler(Plan(cfg).shard(0), cfg)
        _, cands = _fill(sampler, accept)
        kept[budget] = ([c.key for c in cands], sampler.drawn)
    # 2.88 x 200 = 576: the last round starts under the budget and ends past it
    assert kept["2.88"] == kept["50"] and kept["50"][1] > 576


def test_the_dry_run_bounds_what_shards_that_never_fill_draw():
    """--dry-run's max_candidates holds although the last round of a shard may pass its budget."""
    cfg = load_config(None, ["build.target=80", "build.shard_size=50", "build.max_oversample=1.3"])
    plan = Plan(cfg)
    drawn = 0
    for spec in plan.shards():
        sampler = ShardSampler(spec, cfg)
        with pytest.raises(QuotaExhaustedError):
            _fill(sampler, lambda c: False)
        drawn += sampler.drawn
    # budgets 65 and 39 in rounds of up to 32: the bound is (65 + 31) + (39 + 31), above 1.3 x 80 = 104
    assert plan.summary()["max_candidates"] == 166 and 104 < drawn <= 166, drawn


def test_dry_run_plans_a_million_without_ray():
    p = subprocess.run(
        [sys.executable, "-m", "factory.cli", "build", "--target", "1000000", "--shard-size", "1000", "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
    )
    summary = json.loads(p.stdout)
    assert summary["num_shards"] == 1000 and sum(summary["emotions"].values()) == 1000000
    assert "ray" not in p.stderr.lower()  # planning starts no cluster (timing: bench/bench_plan.py)
    # the shipped checkpoint's generator actor: counted from its safetensors headers
    tiny = summary["generator_actor"]
    assert tiny["dtype"] == "float32" and tiny["weights_bytes"] == 4 * tiny["total_parameters"] > 1_000_000


def test_dry_run_sizes_a_generator_actor_at_sd15_sizes_on_the_meta_device(run_factory, tmp_path):
    """`meta:sd15-inpainting` is MAUGen at SD 1.5's sizes with no weights: the dry run prints what one
    generator actor holds; a real build with it is refused in one line."""
    p = run_factory(
        "build", "--dry-run", "--set", "maugen.checkpoint=meta:sd15-inpainting", "--set", "maugen.dtype=float16"
    )
    assert p.returncode == 0, p.stderr
    mem = json.loads(p.stdout)["generator_actor"]
    assert mem["parameters"]["unet"] == 859_535_364  # SD 1.5 inpainting: 4 + 5 input channels
    assert mem["parameters"]["text_encoder"] == 123_060_480 and mem["parameters"]["label_decoder"] > 0
    assert mem["weights_bytes"] == 2 * mem["total_parameters"] and 2.0 < mem["weights_gib"] < 2.3
    # activations at maugen.batch_size (16) with guidance, traced on the meta device: materialised attention
    # scores (64x64 latents: 4096^2 per head) dwarf the fused kernel's; the VAE decode at 512 px bounds the latter
    act = mem["activations"]
    assert act["batch"] == 16 and act["guidance"] is True
    fused, full = act["fused_attention"], act["materialised_attention"]
    assert fused["by_stage"]["vae_decode"] == full["by_stage"]["vae_decode"] > 2**30
    assert full["by_stage"]["step"] > 8 * fused["by_stage"]["step"] > 8 * 2**30
    assert mem["total_gib"]["fused_attention"] == round((mem["weights_bytes"] + fused["peak_bytes"]) / 2**30, 3)
    # the shipped checkpoint's figures: test_dry_run_plans_a_million_without_ray
    p = run_factory("build", "--target", "4", "--out", str(tmp_path / "o"), "--set", "maugen.checkpoint=meta:sd15")
    assert p.returncode == 2 and "has no weights: it sizes `factory build --dry-run` only" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
