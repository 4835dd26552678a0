"""The shipped MAUGen (builtin:tiny-puppet) and what its recipe needs: the 2x2 patch latent, EMA
weights, the checkpoint's label fidelity on held-out identities, and a build through the whole graph.

It is the default generator; about 1 candidate in 5 clears the detectors and the realism
discriminator in a build. The fidelity floors below are regression guards set under what the
shipped weights measure (pipelines/maugen/models/README.md has the numbers), not issue 6's 0.90 aim.
"""

from __future__ import annotations

import json
import re
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import ROOT, SMALL_RAY, factory, factory_on_a_terminal, shard_stats
from test_maugen import ID_WEIGHTS, MICRO

from detectors.metrics import f1_per_au
from detectors.panel import DetectorPanel
from factory.config import MAUGenGeneratorConfig, load_config
from pipelines.maugen import MAUGenConfig, MAUGenPipeline, build_pipeline
from pipelines.maugen.build import set_scheduler
from pipelines.maugen.builtin import BUILTIN_CHECKPOINTS, checkpoint_hash, resolve_checkpoint
from pipelines.maugen.data import PuppetFaceDataset
from pipelines.maugen.train import TrainConfig, Trainer
from pipelines.prompts import TokenBudget, grammar_expand
from pipelines.prompts.targets import random_requests
from pipelines.puppet import PuppetRenderer
from pipelines.puppet.data import identities

RECIPES = BUILTIN_CHECKPOINTS["tiny-puppet"]
#: Floors under the shipped weights' held-out numbers (regression guards; issue 6 aims at 0.90).
LABEL_F1_BAR = 0.78  # measured 0.821 (48 held-out samples, these seeds, the build's sampling; base weights 0.711)
TARGET_F1_BAR = 0.78  # measured 0.824 (base weights 0.702)
REALISM_BAR = 0.86  # measured 0.92 (base weights 0.77)
INDEPENDENT_F1_BAR = 0.74  # labels vs builtin:eval-au (no training or filter role): measured 0.784 (base 0.688)
#: The shipped model passes every check on about 1 candidate in 5 (the label-consensus Jaccard
#: rejects most), so this 8-sample build lowers that one threshold to stay quick: every stage still runs
#: (detect, consensus, realism, all checks), only fewer candidates are rejected.
BUILD_SETS = ["--set", "checks.label_consensus_jaccard=0", "--set", "build.max_oversample=8"]


def test_patch_latent_folds_pixels_losslessly(tmp_path):
    p = build_pipeline(MAUGenConfig(**MICRO, patch_size=2), ID_WEIGHTS, seed=0)
    p.set_progress_bar_config(disable=True)
    assert (p.unet.config.in_channels, p.unet.config.out_channels, p.unet.config.sample_size) == (25, 12, 32)
    assert p.vae_scale_factor == 2 and p.latent_channels == 12 and p.inpainting
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = p.encode_images(x)
    assert z.shape == (2, 12, 32, 32)
    assert torch.equal(p.decode_latents(z), x)
    ds = PuppetFaceDataset(2, 2, split="heldout", seed=3, workers=1)
    ex, masks = np.stack([ds[i].exemplar for i in range(2)]), np.stack([ds[i].mask for i in range(2)])
    call = dict(num_inference_steps=2, mask_image=masks)
    a = p([ds[i].prompt for i in range(2)], ex, generator=torch.Generator().manual_seed(1), **call)
    assert a.images.shape == (2, 64, 64, 3)
    # outside the face the output is the exemplar (inpainting composite)
    outside = masks == 0
    np.testing.assert_array_equal(a.images[outside], ex[outside])
    p.save_pretrained(tmp_path / "m")
    q = MAUGenPipeline.from_pretrained(tmp_path / "m")
    q.set_progress_bar_config(disable=True)
    assert q.vae_scale_factor == 2
    b = q([ds[i].prompt for i in range(2)], ex, generator=torch.Generator().manual_seed(1), **call)
    np.testing.assert_array_equal(a.images, b.images)
    with pytest.raises(ValueError, match="multiple of 3"):
        build_pipeline(MAUGenConfig(**MICRO, patch_size=3), ID_WEIGHTS, seed=0)


def test_ema_weights_go_into_saved_pipelines_and_resume(tmp_path):
    ds = PuppetFaceDataset(12, 3, split="train", seed=1, workers=1)
    base = {"out": str(tmp_path / "run"), "batch_size": 4, "model": MICRO, "checkpoint_every": 2, "warmup": 0}
    base |= {"ema_decay": 0.9, "losses": {"image_label": False, "mutual_train_prob": 0.0}, "lr": 1e-2}
    tr = Trainer(TrainConfig(**base, steps=3), dataset=ds)
    final = tr.fit()
    ck = tr.checkpoints()[-1]
    assert (ck / "pipeline-ema" / "model_index.json").is_file()
    raw = {k: v.clone() for k, v in tr.pipe.unet.state_dict().items()}
    saved = MAUGenPipeline.from_pretrained(final).unet.state_dict()
    shadow = dict(zip([n for n, p in tr.modules.named_parameters() if p.requires_grad], tr.ema.shadow_params))
    w = "conv_in.weight"
    assert torch.allclose(saved[w], shadow[f"unet.{w}"]) and not torch.allclose(saved[w], raw[w])
    # the training weights are restored after saving the EMA's
    assert all(torch.equal(raw[k], v) for k, v in tr.pipe.unet.state_dict().items())
    tr2 = Trainer(TrainConfig(**base, steps=5), dataset=ds)
    assert tr2.resume() and tr2.step == 3 and tr2.ema.optimization_step == 3
    assert all(torch.equal(a, b) for a, b in zip(tr.ema.shadow_params, tr2.ema.shadow_params))


def test_the_shipped_checkpoint_was_trained_by_its_recipe():
    """Its train_config.yaml is the last stage's recipe, and each stage starts from the one before."""
    cfg = load_config(None, ["generator=maugen"])
    assert cfg.maugen.checkpoint == "builtin:tiny-puppet"
    path = resolve_checkpoint(cfg.maugen.checkpoint)
    stages = [yaml.safe_load((ROOT / r).read_text()) for r in RECIPES]
    for before, stage in zip(stages, stages[1:]):
        assert stage["init_from"] == f"{before['out']}/final", stage
    recipe = stages[-1]
    trained = yaml.safe_load((path / "train_config.yaml").read_text())
    assert trained["model"] | recipe["model"] == trained["model"], "the shipped weights were not trained by the recipe"
    assert trained["data"] | recipe["data"] == trained["data"] and trained["losses"] | recipe["losses"] == trained["losses"]
    for key in ("init_from", "steps", "stop_at", "lr", "warmup", "batch_size", "ema_decay", "seed"):
        assert trained.get(key) == recipe.get(key, TrainConfig.model_fields[key].default), key
    unet = json.loads((path / "unet" / "config.json").read_text())
    p = recipe["model"]["patch_size"]
    assert unet["sample_size"] * p == recipe["model"]["image_size"] and unet["out_channels"] == 3 * p * p
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 20 * 2**20, f"the shipped checkpoint is {size / 2**20:.1f} MiB; keep it small"


def test_shipped_checkpoint_labels_agree_with_independent_detectors_on_heldout_identities():
    """The trained model, not random weights: on people it never saw, its labels match what the images
    show, judged by the evaluation panel's AU evaluator (which neither taught MAUGen nor filters a build)
    and by the build's filter panel. It samples as a build does (the `maugen` section's defaults, prompts
    within the text encoder's budget)."""
    ckpt = resolve_checkpoint("builtin:tiny-puppet")
    pipe = MAUGenPipeline.from_pretrained(ckpt)
    pipe.set_progress_bar_config(disable=True)
    sampling = MAUGenGeneratorConfig()
    set_scheduler(pipe, sampling.scheduler)
    n = 48
    people = identities(n, "heldout", seed=5)
    exemplars, masks = PuppetRenderer(size=64).exemplars(people)
    requests = random_requests(n, seed=17)
    targets = np.array([r.intensity for r in requests]) >= 2
    budget = TokenBudget.from_tokenizer(ckpt / "tokenizer")
    out = pipe(
        [grammar_expand(r, budget) for r in requests],
        exemplars,
        num_inference_steps=sampling.steps,
        guidance_scale=sampling.guidance_scale,
        guidance_interval=sampling.guidance_interval,
        mask_image=masks,
        generator=[torch.Generator().manual_seed(i) for i in range(n)],
    )
    det = DetectorPanel(["builtin:au-cnn", "builtin:au-resnet", "builtin:au-vit"], 2, realism="builtin:realism").detect(
        out.images
    )
    independent = DetectorPanel(["builtin:eval-au"], 1).detect(out.images).consensus.occurrence
    labels = out.au_occurrence >= 0.5
    f1_labels = f1_per_au(det.consensus.occurrence, labels).mean
    f1_targets = f1_per_au(det.consensus.occurrence, targets).mean
    f1_independent = f1_per_au(independent, labels).mean
    realism = float(np.mean(det.realism >= 0.5))
    print(
        f"held-out: F1 labels vs consensus {f1_labels:.3f}, targets vs consensus {f1_targets:.3f}, "
        f"labels vs eval-au {f1_independent:.3f}, realism {realism:.2f}"
    )
    assert f1_per_au(targets, labels).mean >= 0.85, "labels do not follow the prompt"
    assert f1_labels >= LABEL_F1_BAR and f1_targets >= TARGET_F1_BAR and realism >= REALISM_BAR
    assert f1_independent >= INDEPENDENT_F1_BAR


def _members(tar_path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_a_build_with_the_shipped_maugen_runs_the_whole_graph(tmp_path, monkeypatch, capsys):
    """README command 1 at a small size, on a terminal: the whole graph runs, and what the user reads
    holds no Python warning and no library's progress bar, then where the corpus is and how to read it.
    On 2 CPUs the default sizing runs a generator per core, each on one torch thread, also where the
    user's OMP_NUM_THREADS (which Ray passes on, and torch would follow) says 2."""
    out = tmp_path / "out"
    args = ["--target", "8", "--shard-size", "4", "--out", str(out), "--set", "generator=maugen", *BUILD_SETS]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    rc, screen = factory_on_a_terminal("build", *args, "--set", "runtime.object_store_mb=100", "--set",
                                       "runtime.num_cpus=2")  # fmt: skip
    assert rc == 0, screen[-3000:]
    busy = re.findall(r"generator (\d+) busy ([^\n]*)", screen)  # logged, then printed at the end
    assert {g for g, _ in busy} == {"0", "1"} and all(", 1 thread," in line for _, line in busy), busy
    assert not re.search(r"\w+Warning\b", screen), screen  # FutureWarning, UserWarning, ... (Ray's own notices are logs)
    assert "it/s]" not in screen and "Loading pipeline components" not in screen and "Loading weights" not in screen
    assert "ETA" in screen and "accepted 8/8" in screen  # the bar's ETA, the final line
    for line in (f"corpus: 8 samples in 2 shards under {out}/shards", "read it:  python -c", f"factory verify {out}"):
        assert line in screen, screen[-2000:]
    build = json.loads((out / "build.json").read_text())
    assert build["config"]["generator"] == "maugen"
    ck = resolve_checkpoint("builtin:tiny-puppet")
    # the checkpoint's content hash is in build.json (a resume with other weights is refused) and tags every row
    assert build["models"]["maugen:builtin:tiny-puppet"] == checkpoint_hash(ck)
    parquets = sorted((out / "shards").glob("*.parquet"))
    tags = {t for f in parquets for t in pq.read_table(f, columns=["generator"]).column(0).to_pylist()}
    assert tags == {f"maugen@{checkpoint_hash(ck)[:12]}"}
    stats = list(shard_stats(out).values())
    assert sum(s["funnel"]["accepted"] for s in stats) == 8
    # every candidate went through detect and the named checks: accepted + rejections add up
    for s in stats:
        assert s["detect"]["enabled"] and s["generator"].startswith("maugen@"), s
        assert s["candidates"] == s["funnel"]["accepted"] + sum(s["rejected"].values()), s
    factory("verify", str(out), check=True)

    # identity leakage: each accepted face's highest similarity to the checkpoint's 400 training subjects,
    # measured (checks.training_similarity unset: never rejected) in the parquet, KEY.json and the report
    leak = build["training_similarity"]
    assert leak["measured"] and leak["subjects"] == 400 and leak["identity_encoder"] == "builtin:identity"
    assert build["models"]["training_subjects:builtin:tiny-puppet"] == leak["sha256"]
    table = pq.read_table(parquets, columns=["key", "training_similarity"])
    sims = dict(zip(table.column("key").to_pylist(), table.column("training_similarity").to_pylist()))
    assert len(sims) == 8 and all(v is not None and -1 <= v <= 1 for v in sims.values()), sims
    for tar in sorted((out / "shards").glob("*.tar")):
        for meta in (json.loads(v) for k, v in _members(tar).items() if k.endswith(".json")):
            assert meta["scores"]["training_similarity"] == pytest.approx(sims[meta["key"]], abs=1e-6)
    assert all(s["rejected"]["training_similarity"] == 0 for s in stats)
    from factory.report import build_report, print_report, report_json
    from factory.report_html import render_html

    rep = json.loads(report_json(build_report(str(out))))  # in this process: `factory report` runs in test_build.py
    got, values = rep["training_similarity"], np.array(sorted(sims.values()))
    assert got["measured"] and got["samples"] == 8 and got["max"] == pytest.approx(values.max(), abs=1e-4)
    assert got["threshold"] == 0.7496 and got["above_threshold"] == int((values > 0.7496).sum())
    for q in (50, 90, 99):  # to the report's 0.001 bins, from above (capped at the max; 4 decimals)
        exact = np.quantile(values, q / 100, method="inverted_cdf")
        assert -5e-5 - 1e-6 <= got["quantiles"][f"p{q}"] - exact <= 0.001 + 1e-6, (q, got["quantiles"], values)
    page = render_html(rep)
    assert 'id="leakage"' in page and "training similarity histogram" in page and "above 0.7496" in page
    print_report(rep)
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("training similarity"))
    assert "max cosine to the 400 MAUGen training subjects" in line and f"max {values.max():.3f}" in line
    assert "check: off (checks.training_similarity unset: measured only)" in line


def test_the_corpus_size_is_the_checkpoint_s_and_another_build_image_size_is_refused():
    from factory.generators import MAUGenGenerator

    with pytest.raises(ValueError, match=r"trained at 64 px but build.image_size is 128; set build.image_size=64"):
        MAUGenGenerator(load_config(None, ["generator=maugen", "build.image_size=128"]))
    # puppet.image_size is the renderer's size, not the corpus': MAUGen makes what it was trained at
    assert MAUGenGenerator(load_config(None, ["generator=maugen", "puppet.image_size=128"])).image_size == 64
    assert MAUGenGenerator(load_config(None, ["generator=maugen", "build.image_size=64"])).image_size == 64


def test_one_nan_sample_is_marked_and_the_rest_of_its_batch_is_kept(monkeypatch):
    """fp16 can overflow in one sample: the pipeline marks it (or raises, for library callers), the
    generator hands it on with NaN labels, and the shard's validity check rejects it alone."""
    from factory.generators import GenerationBatch, MAUGenGenerator, validate_result
    from factory.identities import PuppetSource
    from pipelines.puppet.data import identities

    cfg = load_config(None, ["generator=maugen", "maugen.steps=2"])
    gen = MAUGenGenerator(cfg)
    people = identities(3, "heldout", seed=1)
    ex = PuppetSource(cfg).exemplars(people, gen.image_size)
    batch = GenerationBatch(
        keys=["a", "b", "c"], seeds=np.array([1, 2, 3]), prompts=["brows raised", "a smile", "lips apart"],
        target=np.zeros((3, 12), np.int8), identities=people,
        exemplars=np.stack([e.image for e in ex]), masks=np.stack([e.mask for e in ex]),
    )
    clean = gen.generate(batch)
    decode = gen.pipe.decode_latents

    def one_nan(latents):
        x = decode(latents)
        x[1] = float("nan")
        return x

    monkeypatch.setattr(gen.pipe, "decode_latents", one_nan)
    out = gen.generate(batch)
    np.testing.assert_array_equal(validate_result(out, batch, gen.image_size), [True, False, True])
    for j in (0, 2):  # the others are exactly what they were without the NaN
        np.testing.assert_array_equal(out.images[j], clean.images[j])
        np.testing.assert_array_equal(out.intensity[j], clean.intensity[j])
    assert np.isnan(out.intensity[1]).all() and (out.images[1] == 0).all()
    with pytest.raises(FloatingPointError, match="NaN/inf pixels or labels in 1 of 3 samples"):
        gen.pipe(batch.prompts, batch.exemplars, mask_image=batch.masks, num_inference_steps=2)
