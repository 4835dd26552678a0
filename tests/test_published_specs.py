"""The shipped specs of the published AU detectors (detectors/specs/*.yaml) drive the real runtime.

ME-GraphAU, LibreFace and FMAE-IAT are not in the repo (the user exports them to ONNX, see
detectors/specs/README.md), so each spec is run here against a tiny 224-px stand-in with the
published model's output width and output name, exported with torch.onnx.export like a user's
export would be, through the project's own loader (`load_spec`, `OnnxAUDetector`, `DetectorPanel`).

What is checked:
  * each YAML states the facts read from the authors' code (`PUBLISHED` below, sources in the YAMLs);
  * 64-px and 512-px uint8 batches come out on the 12-AU schema: every output column lands on its
    AU's slot, AUs the model doesn't cover stay NaN, values sit in the kind's range;
  * a probe stand-in that reports what it received shows the input really is the spec's
    224-px crop, in RGB order, normalised with the published mean/std (the ONNX input is static
    1x3x224x224-per-image, so a wrong size or layout would not even run);
  * the shipped specs load as they are, and say which file is missing until it is exported.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from core.facs import AUS, DEFAULT_OCCURRENCE_THRESHOLD, NUM_AUS
from detectors.au import OnnxAUDetector
from detectors.panel import DetectorPanel
from detectors.spec import SpecError, file_sha256, load_spec

SPECS_DIR = Path(__file__).resolve().parents[1] / "detectors" / "specs"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DISFA_8 = [1, 2, 4, 6, 9, 12, 25, 26]

#: The published facts (see each YAML's header for the file and line they come from):
#: (input size, resize before the centre crop, AU order of the output columns, output kind, output name)
PUBLISHED: dict[str, tuple[int, int | None, list[int], str, str]] = {
    "me-graphau-disfa": (224, 256, DISFA_8, "probability", "au_probability"),
    "libreface-disfa-intensity": (224, 256, list(AUS), "intensity", "au_intensity"),
    "fmae-iat-disfa": (224, None, DISFA_8, "logit", "au_logits"),
}
NAMES = sorted(PUBLISHED)

#: Each column j of a stand-in emits CODE[kind](j) + SPREAD * tanh(...): one value band per column,
#: the bands far enough apart that a column landing on another AU's slot is caught.
SPREAD = 0.04


def _code(kind: str, j: int) -> float:
    if kind == "probability":
        return 0.08 + 0.11 * j  # 0.08 .. 0.85 for 8 columns
    if kind == "intensity":
        return 0.2 + 0.42 * j  # 0.2 .. 4.82 for 12 columns
    return -3.5 + 1.0 * j  # logits -3.5 .. 3.5 for 8 columns


def _to_kind(kind: str, v: float) -> float:
    """What the factory reports for a raw output value v of this kind."""
    if kind == "logit":
        return 1.0 / (1.0 + math.exp(-v))
    return v


class StandIn(torch.nn.Module):
    """Global-average-pool + linear, each column offset into its own band (see `_code`)."""

    def __init__(self, kind: str, width: int):
        super().__init__()
        g = torch.Generator().manual_seed(width)
        self.proj = torch.nn.Linear(3, width)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(width, 3, generator=g) * 2.0)
            self.proj.bias.zero_()
        self.register_buffer("code", torch.tensor([_code(kind, j) for j in range(width)], dtype=torch.float32))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = pixel_values.mean(dim=(2, 3))  # (B, 3)
        return self.code + SPREAD * torch.tanh(self.proj(pooled))


#: Regions of the 224-px model input the probe reports on (rows, then columns).
STRIP_ROWS = slice(16, 208)
LEFT_COLS = slice(16, 100)
RIGHT_COLS = slice(124, 208)
RING = 4  # px: the outer ring of the model input


class Probe(torch.nn.Module):
    """Reports what it was fed: per-channel means of a left and a right strip, and the mean of
    channel 1 over the outer 4-px ring; padded with zeros to the published output width."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values
        left = x[:, :, STRIP_ROWS, LEFT_COLS].mean(dim=(2, 3))
        right = x[:, :, STRIP_ROWS, RIGHT_COLS].mean(dim=(2, 3))
        g = x[:, 1]
        n = g.shape[-1]
        ring_sum = (
            g[:, :RING, :].sum(dim=(1, 2))
            + g[:, n - RING :, :].sum(dim=(1, 2))
            + g[:, RING : n - RING, :RING].sum(dim=(1, 2))
            + g[:, RING : n - RING, n - RING :].sum(dim=(1, 2))
        )
        ring = ring_sum / float(n * n - (n - 2 * RING) ** 2)
        pad = x[:, 0, 0, : self.width - 7] * 0.0
        return torch.cat([left, right, ring[:, None], pad], dim=1)


def _export(module: torch.nn.Module, path: Path, size: int, output_name: str) -> None:
    """What a user's export of the published model looks like: static 3 x size x size, dynamic batch."""
    import warnings

    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.zeros(2, 3, size, size),),
            str(path),
            input_names=["pixel_values"],
            output_names=[output_name],
            dynamic_axes={"pixel_values": {0: "batch"}, output_name: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def _stand_in_spec(name: str, module: torch.nn.Module, tmp_path: Path) -> Path:
    """The shipped YAML, rewritten next to a stand-in export: `model:` points at it, sha256 pinned."""
    size, _, aus, _, output_name = PUBLISHED[name]
    folder = tmp_path / name
    folder.mkdir()
    onnx_path = folder / f"{name}-standin.onnx"
    _export(module, onnx_path, size, output_name)
    tree = yaml.safe_load((SPECS_DIR / f"{name}.yaml").read_text())
    tree["model"] = onnx_path.name
    tree["sha256"] = file_sha256(onnx_path)
    spec_path = folder / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return spec_path


def _images(n: int, side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_spec_states_the_published_facts(name: str) -> None:
    loaded = load_spec(SPECS_DIR / f"{name}.yaml", task="au_detector")
    s = loaded.spec
    size, resize, aus, kind, output_name = PUBLISHED[name]
    assert s.name == name
    assert (s.input.size, s.input.resize) == (size, resize)
    assert s.input.mean == pytest.approx(IMAGENET_MEAN) and s.input.std == pytest.approx(IMAGENET_STD)
    assert (s.input.channel_order, s.input.layout) == ("RGB", "NCHW")
    assert s.aus == aus
    assert [(o.kind, o.name) for o in s.outputs] == [(kind, output_name)]
    assert loaded.model_path == SPECS_DIR / f"{name}.onnx"


@pytest.mark.parametrize("name", NAMES)
def test_shipped_spec_names_the_file_to_export(name: str) -> None:
    """Until the user exports the model, loading the shipped spec fails naming the missing file."""
    if (SPECS_DIR / f"{name}.onnx").exists():
        pytest.skip("the model has been exported next to the spec here")
    with pytest.raises(SpecError, match=rf"{name}\.onnx .*does not exist"):
        OnnxAUDetector(str(SPECS_DIR / f"{name}.yaml"))


@pytest.mark.parametrize("name", NAMES)
def test_outputs_land_on_their_au_slots(name: str, tmp_path: Path) -> None:
    size, _, aus, kind, _ = PUBLISHED[name]
    det = OnnxAUDetector(str(_stand_in_spec(name, StandIn(kind, len(aus)), tmp_path)), threads=1)
    assert det.session.get_inputs()[0].shape[1:] == [3, size, size]
    covered = [AUS.index(au) for au in aus]
    uncovered = [i for i in range(NUM_AUS) if i not in covered]
    assert det.covers.tolist() == [i in covered for i in range(NUM_AUS)]

    for side, seed in ((64, 0), (512, 1)):
        out = det.predict(_images(5, side, seed))
        assert out.name == name and len(out) == 5
        assert out.probability.shape == out.intensity.shape == out.occurrence.shape == (5, NUM_AUS)
        values = out.intensity if kind == "intensity" else out.probability
        other = out.probability if kind == "intensity" else out.intensity
        assert np.isnan(other).all(), "a kind the spec doesn't declare must stay NaN"
        assert np.isnan(values[:, uncovered]).all() and np.isnan(out.occurrence[:, uncovered]).all()
        assert np.isfinite(values[:, covered]).all()
        lo, hi = (0.0, 5.0) if kind == "intensity" else (0.0, 1.0)
        assert ((values[:, covered] >= lo) & (values[:, covered] <= hi)).all()
        assert set(np.unique(out.occurrence[:, covered]).tolist()) <= {0.0, 1.0}
        for j, au in enumerate(aus):
            band = sorted((_to_kind(kind, _code(kind, j) - SPREAD), _to_kind(kind, _code(kind, j) + SPREAD)))
            got = values[:, AUS.index(au)]
            assert ((got >= band[0] - 1e-5) & (got <= band[1] + 1e-5)).all(), (
                f"{name}: AU{au} (output column {j}) reads {got}, expected within {band}"
            )
        if kind == "intensity":
            want = np.floor(values[:, covered] + 0.5) >= DEFAULT_OCCURRENCE_THRESHOLD
        else:
            want = values[:, covered] >= 0.5
        assert (out.occurrence[:, covered] == want).all()


L, R, K = (220, 30, 140), (40, 90, 200), (0, 255, 0)


def _probe_image(side: int) -> np.ndarray:
    """Left half L, right half R, inside a frame (side * 24/512 px wide) of colour K."""
    img = np.empty((side, side, 3), dtype=np.uint8)
    img[:, : side // 2] = L
    img[:, side // 2 :] = R
    f = side * 24 // 512
    img[:f], img[-f:], img[:, :f], img[:, -f:] = K, K, K, K
    return img


@pytest.mark.parametrize("name", NAMES)
def test_model_sees_the_declared_crop_and_normalisation(name: str, tmp_path: Path) -> None:
    """The probe sees RGB normalised with the published mean/std; where the spec resizes to 256 and
    centre-crops 224 the frame is cut away, where it resizes to 224 (FMAE-IAT) the frame stays."""
    size, resize, aus, _, _ = PUBLISHED[name]
    det = OnnxAUDetector(str(_stand_in_spec(name, Probe(len(aus)), tmp_path)), threads=1)

    def norm(rgb: tuple[int, int, int], c: int) -> float:
        return (rgb[c] / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]

    # A 24/512 frame is 12 px at 256 (cut away by the 16-px margin of a 224 crop) but 10.5 px at 224
    # with no crop: the ring of the model input is then the frame's colour.
    cropped = (resize or size) > size
    ring = (norm(L, 1) + norm(R, 1)) / 2 if cropped else norm(K, 1)
    want = [norm(L, c) for c in range(3)] + [norm(R, c) for c in range(3)] + [ring]
    for side in (64, 512):
        (raw,) = det.run(np.stack([_probe_image(side)] * 3))
        assert raw.shape == (3, len(aus))
        np.testing.assert_allclose(raw[:, :7], np.tile(want, (3, 1)), atol=0.05, err_msg=f"{name} at {side} px")
        assert np.all(raw[:, 7:] == 0.0)


def test_the_three_specs_run_together_in_the_panel(tmp_path: Path) -> None:
    """The detect stage's own class, as `detect.au_detectors` would configure it."""
    refs = [str(_stand_in_spec(n, StandIn(PUBLISHED[n][3], len(PUBLISHED[n][2])), tmp_path)) for n in NAMES]
    panel = DetectorPanel(refs, min_agree=2, realism=None, threads=1)
    det = panel.detect(_images(4, 64, 2))
    assert [o.name for o in det.outputs] == NAMES
    assert len(det) == 4
    # LibreFace alone covers AUs 5, 15, 17, 20: with min_agree=2 they can never be agreed.
    only_libreface = [AUS.index(au) for au in AUS if au not in DISFA_8]
    cov = np.sum([o.covers for o in det.outputs], axis=0)
    assert cov[only_libreface].tolist() == [1] * 4 and set(cov.tolist()) == {1, 3}
    assert {d["name"]: d["sha256"] for d in panel.describe()["au_detectors"]} == {
        n: file_sha256(tmp_path / n / f"{n}-standin.onnx") for n in NAMES
    }
