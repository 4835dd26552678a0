"""Detectors: specs, ONNX Runtime loading and its errors, pre-processing, consensus, and the shipped
tiny models (ONNX == torch, held-out quality on identities they never saw)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from core.facs import AUS, NUM_AUS
from core.identity_net import IdentityNet
from detectors import data
from detectors.au import AUOutput, OnnxAUDetector
from detectors.builtin import BUILTIN_MODELS, MODELS_DIR, resolve
from detectors.consensus import consensus
from detectors.identity import OnnxIdentityEncoder
from detectors.metrics import au_report, roc_auc
from detectors.models import AUDetectorNet, IdentityResNet, RealismNet
from detectors.panel import DetectorPanel
from detectors.realism import OnnxRealism
from detectors.runtime import DetectorOutputError
from detectors.spec import SpecError, load_spec
from detectors.train import _AUExport, _RealismExport, export_onnx, to_input

SPEC_AU = {
    "task": "au_detector",
    "name": "tiny",
    "model": "model.onnx",
    "input": {"size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    "aus": list(AUS),
    "outputs": [{"kind": "logit", "name": "occurrence_logits"}, {"kind": "intensity", "name": "intensity"}],
}


@pytest.fixture(scope="module")
def tiny_au(tmp_path_factory) -> Path:
    """A random-weight AU detector exported to ONNX with its spec (no training: fast)."""
    d = tmp_path_factory.mktemp("tiny_au")
    torch.manual_seed(0)
    net = AUDetectorNet(arch="cnn", width=8).eval()
    export_onnx(_AUExport(net), d / "model.onnx", ["occurrence_logits", "intensity"], 64)
    (d / "spec.yaml").write_text(yaml.safe_dump(SPEC_AU))
    net.save_pretrained(d / "torch")
    return d


def _spec(dirpath: Path, **changes) -> Path:
    tree = dict(SPEC_AU) | changes
    p = dirpath / "spec.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def _images(n: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- specs and loading


def test_spec_rejects_bad_files(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("task: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    with pytest.raises(SpecError, match=r"outputs.*kind"):
        load_spec(_spec(tmp_path, outputs=[{"kind": "score"}]))
    with pytest.raises(SpecError, match="aus lists an AU twice"):
        load_spec(_spec(tmp_path, aus=[1, 1, 2]))
    with pytest.raises(SpecError, match="covers none of the 12 AUs"):
        load_spec(_spec(tmp_path, aus=[7, 10, 14]))
    with pytest.raises(SpecError, match="resize .* must be >= size"):
        load_spec(_spec(tmp_path, input={"size": 224, "resize": 200}))
    with pytest.raises(SpecError, match="describes a au_detector model, but a realism"):
        load_spec(_spec(tmp_path), task="realism")
    with pytest.raises(SpecError, match="not a built-in model"):
        resolve("builtin:graphau")


def test_missing_corrupt_and_replaced_onnx_files(tiny_au, tmp_path):
    spec = _spec(tmp_path)
    with pytest.raises(SpecError, match=r"model.onnx .* does not exist.*fix `model:`"):
        OnnxAUDetector(str(spec))
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07garbage, not a protobuf" * 50)
    with pytest.raises(SpecError, match="could not be loaded .* corrupt or not ONNX"):
        OnnxAUDetector(str(spec))
    # A truncated copy of a real model: also corrupt.
    good = (tiny_au / "model.onnx").read_bytes()
    (tmp_path / "model.onnx").write_bytes(good[: len(good) // 2])
    with pytest.raises(SpecError, match="could not be loaded"):
        OnnxAUDetector(str(spec))
    # A spec that pins the hash catches a swapped file that would otherwise load.
    (tmp_path / "model.onnx").write_bytes(good)
    pinned = _spec(tmp_path, sha256="0" * 64)
    with pytest.raises(SpecError, match="corrupt or was replaced"):
        OnnxAUDetector(str(pinned))


def test_spec_au_list_must_match_output_width(tiny_au, tmp_path):
    shutil.copy(tiny_au / "model.onnx", tmp_path / "model.onnx")
    spec = _spec(tmp_path, aus=[1, 2, 4, 5, 6, 9, 12, 15, 17, 20])
    with pytest.raises(SpecError, match=r"has width 12 but the spec implies 10 .*fix the spec's AU list"):
        OnnxAUDetector(str(spec))
    with pytest.raises(SpecError, match="'occ' is not an output"):
        OnnxAUDetector(str(_spec(tmp_path, outputs=[{"kind": "logit", "name": "occ"}])))


def test_nan_outputs_are_an_error_naming_the_model(tmp_path):
    class NaNNet(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(1, 2, 3))[:, None].expand(-1, NUM_AUS) * float("nan")

    export_onnx(NaNNet(), tmp_path / "model.onnx", ["occurrence_logits"], 64)
    spec = _spec(tmp_path, outputs=[{"kind": "logit"}])
    det = OnnxAUDetector(str(spec))
    with pytest.raises(DetectorOutputError, match=r"tiny .* returned NaN/inf .* for 4 of 4 images"):
        det.predict(_images(4))


def test_preprocessing_follows_the_spec(tiny_au, tmp_path):
    shutil.copy(tiny_au / "model.onnx", tmp_path / "model.onnx")
    imgs = _images(3)
    rgb = OnnxAUDetector(str(_spec(tmp_path)))
    x = rgb.preprocess(imgs)
    np.testing.assert_allclose(x, to_input(imgs).numpy(), atol=1e-6)
    bgr = OnnxAUDetector(str(_spec(tmp_path, input={"size": 64, "channel_order": "BGR", "mean": [0.1, 0.2, 0.3]})))
    xb = bgr.preprocess(imgs)
    expect = (imgs[..., ::-1].astype(np.float32) / 255.0 - np.array([0.1, 0.2, 0.3])) / 0.5
    np.testing.assert_allclose(xb, expect.transpose(0, 3, 1, 2), atol=1e-5)
    # resize 80 then centre crop 64 of a 128 px image: the crop is the middle of the downscaled image
    big = np.zeros((1, 128, 128, 3), np.uint8)
    big[:, 40:88, 40:88] = 255
    crop = OnnxAUDetector(str(_spec(tmp_path, input={"size": 64, "resize": 80})))
    xc = crop.preprocess(big)
    assert xc.shape == (1, 3, 64, 64)
    centre = xc[0, 0, 32, 32]
    corner = xc[0, 0, 0, 0]
    assert centre == pytest.approx(1.0, abs=1e-3) and corner == pytest.approx(-1.0, abs=1e-3)


class _SessionSpy:
    """Wraps an ONNX Runtime session and records every call made on it."""

    def __init__(self, session):
        self._session = session
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name):
        attr = getattr(self._session, name)

        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return attr(*args, **kwargs)

        return record if callable(attr) else attr


def test_on_the_cpu_provider_the_session_runs_exactly_as_before(tiny_au):
    det = OnnxAUDetector(str(tiny_au / "spec.yaml"), batch_size=3)
    assert det.providers[0] == "CPUExecutionProvider" and det.io_binding is False
    spy = det.session = _SessionSpy(det.session)
    imgs = _images(7)
    out = det.predict(imgs)
    assert [name for name, _, _ in spy.calls] == ["run", "run", "run"]  # batches of 3, 3, 1; no IO binding
    for (_, args, kwargs), part in zip(spy.calls, (imgs[:3], imgs[3:6], imgs[6:])):
        assert args[0] == det.output_names and not kwargs and list(args[1]) == [det.input_name]
        np.testing.assert_array_equal(args[1][det.input_name], det.preprocess(part))
    assert out.occurrence.shape == (7, NUM_AUS)


def test_io_binding_gives_the_session_runs_outputs_and_reuses_its_input_buffers(tiny_au):
    """The CUDA path, run on the CPU device (the code is the same but for the device name)."""
    plain = OnnxAUDetector(str(tiny_au / "spec.yaml"), batch_size=3)
    bound = OnnxAUDetector(str(tiny_au / "spec.yaml"), batch_size=3, io_binding=True)
    assert bound.binding_device == ("cpu", 0)
    spy = bound.session = _SessionSpy(bound.session)
    for n in (7, 8, 7):  # remainders 1, 2, 1
        imgs = _images(n, seed=n)
        a, b = plain.predict(imgs), bound.predict(imgs)
        np.testing.assert_allclose(b.probability, a.probability, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(b.intensity, a.intensity, rtol=1e-6, atol=1e-7)
    names = [name for name, _, _ in spy.calls]
    assert "run" not in names and names.count("run_with_iobinding") == 9
    assert sorted(k[0] for k in bound._buffers) == [1, 3]  # the full batch's buffer and the last remainder's


def test_detector_maps_a_subset_of_aus_into_the_12_vector(tiny_au, tmp_path):
    """A GraphAU-like spec: 8 DISFA AUs plus AU7 (not one of ours), probability output."""

    class Prob(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b = x.shape[0]
            return torch.linspace(0.05, 0.95, 9).expand(b, 9) + 0 * x.mean()

    export_onnx(Prob(), tmp_path / "model.onnx", ["p"], 64)
    aus = [1, 2, 4, 6, 7, 9, 12, 25, 26]
    det = OnnxAUDetector(str(_spec(tmp_path, aus=aus, outputs=[{"kind": "probability"}])))
    out = det.predict(_images(2))
    want = np.linspace(0.05, 0.95, 9)
    for c, au in enumerate(aus):
        if au in AUS:
            assert out.probability[0, AUS.index(au)] == pytest.approx(want[c], abs=1e-6)
    for au in (5, 15, 17, 20):
        assert np.isnan(out.probability[0, AUS.index(au)]) and np.isnan(out.occurrence[0, AUS.index(au)])
    assert np.isnan(out.intensity).all()
    assert out.covers.sum() == 8


# ----------------------------------------------------------------------------- consensus


def _out(name: str, occ: list[list[float]], inten: list[list[float]] | None = None) -> AUOutput:
    o = np.array(occ, dtype=np.float32)
    i = np.array(inten, dtype=np.float32) if inten is not None else np.full_like(o, np.nan)
    return AUOutput(name=name, probability=o.copy(), intensity=i, occurrence=o, covers=~np.isnan(o[0]))


def test_consensus_k_of_n():
    nan = np.nan
    pad = [0.0] * (NUM_AUS - 4)
    a = _out("a", [[1, 1, 0, 1, *pad]], [[3, 4, 0, 2, *pad]])
    b = _out("b", [[1, 0, 0, nan, *pad]], [[4, 1, 1, nan, *pad]])
    c = _out("c", [[0, 0, 1, nan, *pad]])  # probability-only: votes, no intensity
    r = consensus([a, b, c], k=2)
    # AU1: 2 of 3 say present -> present, agreed. AU2: 2 of 3 absent -> absent, agreed.
    # AU4: 2 of 3 absent -> agreed absent. AU5: covered by one detector only -> never agreed with k=2.
    assert r.occurrence[0, :4].tolist() == [True, False, False, True]
    assert r.agree[0, :4].tolist() == [True, True, True, False]
    assert r.votes[0, :4].tolist() == [2, 1, 1, 1]
    assert r.coverage[:4].tolist() == [3, 3, 3, 1]
    # intensity: median over the intensity-capable covering detectors
    assert r.intensity[0, :4].tolist() == pytest.approx([3.5, 2.5, 0.5, 2.0])
    # k=3 needs unanimity
    r3 = consensus([a, b, c], k=3)
    assert r3.agree[0, :4].tolist() == [False, False, False, False]
    assert r3.agree[0, 4:].all()  # every detector says absent there
    # a 1-1 tie is never agreed, whatever k
    tie = consensus([a, b], k=1)
    assert not tie.agree[0, 1] and tie.agree[0, 0]
    with pytest.raises(ValueError, match="k must be >= 1"):
        consensus([a], k=0)


# ----------------------------------------------------------------------------- the shipped models


def test_builtin_models_are_shipped_with_pinned_hashes():
    for name in BUILTIN_MODELS:
        spec = load_spec(resolve(f"builtin:{name}"))
        assert spec.spec.sha256, f"{name}: spec must pin the model hash"
        assert spec.model_path.stat().st_size < 2_000_000, f"{name}: keep the committed model small"
        assert (MODELS_DIR / name / "eval.json").is_file()


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_onnx_matches_torch(name):
    spec = load_spec(resolve(f"builtin:{name}"))
    imgs = data.au_set(16, 8, "heldout", seed=5).images
    x = to_input(imgs)
    with torch.no_grad():
        if spec.spec.task == "au_detector":
            net = AUDetectorNet.from_pretrained(spec.torch_path).eval()
            logits, inten = net(x)
            out = OnnxAUDetector(spec)
            raw = out.run(imgs)
            np.testing.assert_allclose(raw[0], logits.numpy(), atol=1e-4)
            np.testing.assert_allclose(raw[1], inten.numpy(), atol=1e-4)
        elif spec.spec.task == "realism":
            net = RealismNet.from_pretrained(spec.torch_path).eval()
            np.testing.assert_allclose(OnnxRealism(spec).score(imgs), _RealismExport(net)(x)[:, 0].numpy(), atol=1e-4)
        else:
            cls = IdentityResNet if name == "eval-identity" else IdentityNet
            net = cls.from_pretrained(spec.torch_path).eval()
            np.testing.assert_allclose(OnnxIdentityEncoder(spec).embed(imgs), net(x).numpy(), atol=1e-4)


@pytest.fixture(scope="module")
def heldout():
    """Fresh renders of identities no model trained on (a seed the training eval did not use)."""
    return data.au_set(600, 60, "heldout", seed=11, workers=1)


@pytest.mark.parametrize("name", ["au-cnn", "au-resnet", "au-vit", "eval-au"])
def test_au_detectors_on_unseen_identities(name, heldout):
    det = OnnxAUDetector(str(resolve(f"builtin:{name}")))
    out = det.predict(heldout.images)
    rep = au_report(heldout.intensity, out.probability, out.intensity, 2)
    # A regression guard on 600 fresh renders; the full held-out numbers (3000 renders) are in each
    # model's eval.json and the issue note (all three reach the 0.90 target there).
    assert rep["f1_mean"] >= 0.87, rep["f1"]
    assert rep["mae_mean"] <= 0.5, rep["mae"]


def test_panel_consensus_beats_chance_and_agrees_mostly(heldout):
    panel = DetectorPanel(["builtin:au-cnn", "builtin:au-resnet", "builtin:au-vit"], 2, realism="builtin:realism")
    det = panel.detect(heldout.images)
    truth = heldout.intensity >= 2
    acc = (det.consensus.occurrence == truth).mean()
    assert acc >= 0.95
    assert det.consensus.agree.mean() >= 0.95
    assert (det.realism >= 0.5).mean() >= 0.95  # clean renders are realistic


def test_realism_separates_renders_from_negatives():
    images, labels, _ = data.realism_set(400, 40, "heldout", seed=13, workers=1)
    scores = OnnxRealism(str(resolve("builtin:realism"))).score(images)
    assert roc_auc(labels, scores) >= 0.95


@pytest.mark.parametrize("name", ["identity", "eval-identity"])
def test_identity_encoder_verifies_unseen_people(name, heldout):
    enc = OnnxIdentityEncoder(str(resolve(f"builtin:{name}")))
    emb = enc.embed(heldout.images)
    same = heldout.identity[:, None] == heldout.identity[None, :]
    sims = emb @ emb.T
    off = ~np.eye(len(emb), dtype=bool)
    acc = ((sims >= enc.verify_threshold) == same)[off]
    # balanced accuracy: genuine pairs are rare among all pairs
    bal = 0.5 * (acc[same[off]].mean() + acc[~same[off]].mean())
    assert bal >= 0.9


def test_train_command_exports_a_loadable_model_with_its_eval(tmp_path):
    """`factory detectors train` end to end on a tiny recipe (the committed models use the full one)."""
    from conftest import factory

    for name in ("au-cnn", "identity"):
        p = factory(
            "detectors",
            "train",
            name,
            "--out",
            str(tmp_path),
            "--epochs",
            "1",
            "--train-samples",
            "96",
            "--train-people",
            "16",
            "--heldout-samples",
            "48",
        )
        assert p.returncode == 0, p.stderr[-3000:]
        d = tmp_path / name
        assert {"model.onnx", "spec.yaml", "eval.json", "torch"} <= {x.name for x in d.iterdir()}
        spec = load_spec(d / "spec.yaml")
        assert spec.spec.sha256 and spec.torch_path.is_dir()
        assert '"heldout"' in p.stdout
    det = OnnxAUDetector(str(tmp_path / "au-cnn" / "spec.yaml"))
    assert det.predict(_images(2)).intensity.shape == (2, NUM_AUS)
    p = factory("detectors", "train", "au-transformer", "--out", str(tmp_path))
    assert p.returncode == 2 and "unknown model 'au-transformer'" in p.stderr


def test_feature_network_for_frechet_distances(heldout):
    from detectors.features import FeatureNetwork
    from detectors.metrics import frechet_distance

    assert FeatureNetwork("eval-au-gap")(heldout.images[:4]).shape == (4, 64)
    net = FeatureNetwork("puppet-realism-gap")
    a = net(heldout.images[:200])
    assert a.shape == (200, 128) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, net(heldout.images[:200]))
    # renders vs the same renders degraded by noise are farther apart than two halves of the renders
    rng = np.random.default_rng(0)
    noisy = np.clip(heldout.images[200:400] + rng.normal(0, 40, heldout.images[200:400].shape), 0, 255).astype(np.uint8)
    same = frechet_distance(a, net(heldout.images[200:400]))
    far = frechet_distance(a, net(noisy))
    assert far > 5 * same
    with pytest.raises(ValueError, match="unknown feature network"):
        FeatureNetwork("inception")
    with pytest.raises(ValueError, match="expected uint8"):
        net(heldout.images[:2].astype(np.float32))


def test_every_channel_swap_negative_differs_from_its_render():
    """A realism negative must be degraded: a channel order drawn as the original would be a clean
    render labelled fake (1 in 20 of them before)."""
    from detectors.data import degrade

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    outs = [degrade(img, img, "channel_swap", np.random.default_rng(s)) for s in range(300)]
    assert not any(np.array_equal(o.astype(np.uint8), img) for o in outs)
    orders = {tuple(int(o[0, 0, c]) for c in range(3)) for o in outs}
    assert len(orders) == 6  # the five other orders and the inversion


def test_failure_shaped_negatives_break_only_feature_regions_and_leave_the_committed_recipe_alone():
    """realism-gen's negatives break a face inside its brows/eyes/nose/mouth zones only; with failures off
    the realism set draws exactly what the committed `realism` was trained on (the same arrays)."""
    from pipelines.puppet import PuppetRenderer

    plain = data.realism_set(48, 6, "train", 0, 64, 1)
    again = data.realism_set(48, 6, "train", 0, 64, 1, failures=False)
    for a, b in zip(plain, again):
        np.testing.assert_array_equal(a, b)
    images, labels, kinds = data.realism_set(96, 6, "train", 0, 64, 1, failures=True)
    first = len(data.NEGATIVE_KINDS)
    hit = np.nonzero(kinds >= first)[0]
    assert {data.ALL_KINDS[k] for k in kinds[hit]} == set(data.FAILURE_KINDS) and (labels[hit] == 0).all()
    base = data.au_set(96, 6, "train", 100, 64, 1)
    renderer = PuppetRenderer(64)
    for i in hit:
        regions = np.any(renderer.feature_masks(base.people[int(base.identity[i])]), axis=0)
        changed = np.any(images[i] != base.images[i], axis=-1)
        assert changed.any() and not (changed & ~regions).any(), data.ALL_KINDS[kinds[i]]


def test_realism_trained_against_generated_faces_is_calibrated_on_clean_renders(tmp_path):
    """train_realism with a generator's outputs (here: stand-ins given directly) counts them as the kind
    `generated`, and its calibration makes 0.5 the score that the recipe's share of clean renders reaches."""
    from detectors.train import TrainRecipe, train_realism

    rng = np.random.default_rng(0)
    fakes = data.au_set(64, 8, "train", 5, 64, 1).images.astype(np.float32)
    fakes = np.clip(fakes + rng.normal(0, 18, fakes.shape), 0, 255).astype(np.uint8)  # grainy faces
    recipe = TrainRecipe(
        train_samples=384, train_people=16, heldout_samples=256, heldout_people=16, epochs=2, workers=1,
        failures=True, generator="stand-in", real_accepted=0.9,
    )  # fmt: skip
    with pytest.raises(ValueError, match="pass its raw outputs"):
        train_realism(tmp_path / "none", recipe)
    rep = train_realism(tmp_path / "rg", recipe, (fakes[:48], fakes[48:]), name="puppet-realism-gen")
    held = rep["heldout"]
    assert held["per_negative_kind"]["generated"]["n"] == 16 and set(data.FAILURE_KINDS) <= set(held["per_negative_kind"])
    assert rep["calibration"]["real_accepted"] == 0.9 and 0.8 <= held["real_accepted"] <= 0.97, held
    assert load_spec(tmp_path / "rg" / "spec.yaml").spec.name == "puppet-realism-gen"


@pytest.mark.slow  # ~30 s: samples the shipped MAUGen; the default suite covers train_realism with stand-ins
def test_realism_gen_command_samples_the_generator_as_a_build_does(tmp_path):
    """`factory detectors train realism-gen` draws the shipped MAUGen's raw outputs through the build's
    generate stage and trains on them; a generator that does not exist is one line naming it."""
    from conftest import factory

    small = ["--epochs", "1", "--train-samples", "128", "--train-people", "8", "--heldout-samples", "64"]
    cache = tmp_path / "cache"
    small += ["--generated-cache", str(cache)]
    p = factory("detectors", "train", "realism-gen", "--out", str(tmp_path), *small, "--generated-samples", "8")
    assert p.returncode == 0, p.stderr[-3000:]
    kept = sorted(cache.rglob("*.npy"))
    assert len(kept) == 2 and not list(cache.rglob("*.tmp.npy"))  # one batch per split, each whole
    before = (tmp_path / "realism-gen" / "model.onnx").read_bytes()
    p = factory("detectors", "train", "realism-gen", "--out", str(tmp_path), *small, "--generated-samples", "8")
    assert p.returncode == 0 and "generated 8/8" not in p.stderr  # served from the cache, nothing sampled
    assert (tmp_path / "realism-gen" / "model.onnx").read_bytes() == before
    rep = yaml.safe_load((tmp_path / "realism-gen" / "eval.json").read_text())
    assert rep["heldout"]["per_negative_kind"]["generated"]["n"] == 2 and rep["recipe"]["generator"] == "builtin:tiny-puppet"
    assert rep["calibration"]["real_accepted"] == 0.98
    p = factory("detectors", "train", "realism-gen", "--out", str(tmp_path), *small, "--generator", str(tmp_path / "nope"))
    assert p.returncode == 2 and str(tmp_path / "nope") in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = factory("detectors", "train", "au-cnn", "--out", str(tmp_path), "--generated-samples", "8")
    assert p.returncode == 2 and "realism-gen" in p.stderr
