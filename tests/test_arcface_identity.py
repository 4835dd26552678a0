"""ArcFace's IResNet as MAUGen's identity encoder, fed by an identity spec (issue 20, item 6).

One identity spec names two files of one network: the ONNX export (`model:`), which the identity check,
eval and the leakage measure run, and insightface arcface_torch's `backbone.pth` (`torch_weights:` with
`torch_arch:`), which MAUGen loads as its torch `identity_encoder` for C_ID and the identity loss. The
published R50/R100 files are not in the repo, so a random-weight IResNet-18 stands in: its state_dict
is saved as a `.pth` in arcface_torch's key layout (checked against that layout, written out below),
exported to ONNX as arcface_torch's torch2onnx.py does (input "data", dynamic batch, generated output
name), and the shipped arcface-iresnet50.yaml is rewritten to point at the two files.

What is checked:
  * the torch module from `torch_identity_encoder(spec)` and `OnnxIdentityEncoder(spec)` give the same
    embeddings on 64-, 112- and 160-px images (each path resizes to 112 its own way: the torch path
    differentiably in [-1, 1], the runtime on uint8);
  * the identity loss's gradient reaches the input image, and none reaches the frozen encoder;
  * a missing, corrupt or other-architecture `.pth`, or an unknown `torch_arch`, is one line naming the
    file and the fix;
  * (`-m slow`) MAUGen builds around the IResNet (a 512-d C_ID) and a checkpoint saves and reloads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from core.iresnet import CheckpointError, IResNet
from detectors.builtin import torch_identity_encoder
from detectors.identity import OnnxIdentityEncoder
from detectors.spec import SpecError, load_spec
from pipelines.maugen import core as mcore
from pipelines.maugen.losses import identity_loss

SPECS_DIR = Path(__file__).resolve().parents[1] / "detectors" / "specs"
R18 = (2, 2, 2, 2)


def arcface_keys(blocks: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """State_dict keys and shapes of arcface_torch's IResNet (backbones/iresnet.py), written out from its
    layer names: stem conv1/bn1/prelu, layerK.i.{bn1,conv1,bn2,prelu,conv2,bn3,downsample.0/1}, bn2, fc,
    features."""

    def bn(name: str, c: int) -> dict[str, tuple[int, ...]]:
        return {f"{name}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")} | {
            f"{name}.num_batches_tracked": ()
        }

    keys = {"conv1.weight": (64, 3, 3, 3), "prelu.weight": (64,)} | bn("bn1", 64)
    cin = 64
    for k, (n, w) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for i in range(n):
            p, c = f"layer{k}.{i}", cin if i == 0 else w
            keys |= bn(f"{p}.bn1", c) | bn(f"{p}.bn2", w) | bn(f"{p}.bn3", w)
            keys |= {f"{p}.conv1.weight": (w, c, 3, 3), f"{p}.prelu.weight": (w,), f"{p}.conv2.weight": (w, w, 3, 3)}
            if i == 0:
                keys |= {f"{p}.downsample.0.weight": (w, c, 1, 1)} | bn(f"{p}.downsample.1", w)
        cin = w
    return keys | bn("bn2", 512) | {"fc.weight": (512, 512 * 7 * 7), "fc.bias": (512,)} | bn("features", 512)


class _Raw(torch.nn.Module):
    """arcface_torch's forward as its torch2onnx.py exports it: the normalised face -> the raw feature."""

    def __init__(self, net: IResNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features_of(x)


def _spec(folder: Path, arch: str = "iresnet18", pth: str = "arcface-iresnet18.pth") -> Path:
    """The shipped arcface-iresnet50.yaml, pointed at the stand-in's files."""
    tree = yaml.safe_load((SPECS_DIR / "arcface-iresnet50.yaml").read_text())
    tree |= {"name": "arcface-stand-in", "model": "arcface-iresnet18.onnx", "torch_weights": pth, "torch_arch": arch}
    path = folder / f"spec-{arch}-{Path(pth).stem}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def arcface(tmp_path_factory) -> tuple[Path, IResNet]:
    """A random-weight IResNet-18 (BatchNorm statistics randomised too, so a misplaced key shows) saved as
    a `.pth` and exported to ONNX next to its spec."""
    import warnings

    folder = tmp_path_factory.mktemp("arcface")
    torch.manual_seed(0)
    net = IResNet(arch="iresnet18")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    net.eval()
    torch.save(net.state_dict(), folder / "arcface-iresnet18.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Raw(net),
            (torch.zeros(1, 3, 112, 112),),
            str(folder / "arcface-iresnet18.onnx"),
            input_names=["data"],
            dynamic_axes={"data": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return _spec(folder), net


@pytest.fixture(scope="module")
def encoder(arcface) -> IResNet:
    """The stand-in loaded as MAUGen loads `model.identity_encoder`: through the spec."""
    return torch_identity_encoder(str(arcface[0]))


def _faces(size: int, n: int = 4, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3): smooth colour fields, different per image."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 3, 8, 8)).astype(np.float32)
    x = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(size, size), mode="bicubic")
    return x.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()


def _to_unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def test_checkpoint_has_arcface_torch_key_layout(arcface):
    spec, _ = arcface
    state = torch.load(spec.parent / "arcface-iresnet18.pth", weights_only=True)
    want = arcface_keys(R18)
    assert sorted(state) == sorted(want)
    assert {k: tuple(v.shape) for k, v in state.items()} == want
    for arch, blocks in {"iresnet50": (3, 4, 14, 3), "iresnet100": (3, 13, 30, 3)}.items():
        with torch.device("meta"):
            net = IResNet(arch=arch)
        assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == arcface_keys(blocks)


def test_torch_and_onnx_paths_give_the_same_embeddings(arcface, encoder):
    spec, _ = arcface
    enc = encoder
    assert isinstance(enc, IResNet) and enc.config.arch == "iresnet18" and enc.config.dim == 512
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    onnx = OnnxIdentityEncoder(str(spec))
    assert onnx.dim == 512
    for size in (64, 112, 160):
        images = _faces(size, n=2, seed=size)
        ref = onnx.embed(images)
        with torch.no_grad():
            got = mcore.embed_identity(enc, _to_unit(images)).numpy()
        assert got.shape == (2, 512)
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        err = np.abs(got - ref).max()
        spread = np.abs(ref[:, None] - ref[None]).max()  # how far apart the images' embeddings are
        assert err < 2e-3 and spread > 50 * err, (size, err, spread)
        assert (np.sum(got * ref, axis=1) > 0.9999).all()


def test_identity_loss_gradient_reaches_the_image(encoder):
    enc = encoder
    x = _to_unit(_faces(64, n=2, seed=1)).requires_grad_(True)
    with torch.no_grad():
        target = mcore.embed_identity(enc, _to_unit(_faces(64, n=2, seed=2)))
    loss = identity_loss(mcore.embed_identity(enc, x), target, torch.ones(2))
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.parameters())


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_bad_checkpoint_or_arch_is_one_line_naming_the_file_and_the_fix(arcface, tmp_path):
    spec, _ = arcface
    folder = spec.parent
    bad = folder / "corrupt.pth"
    bad.write_bytes((folder / "arcface-iresnet18.pth").read_bytes()[:5000])
    with pytest.raises(CheckpointError) as err:
        torch_identity_encoder(str(_spec(folder, pth="corrupt.pth")))
    msg = _one_line(err)
    assert bad.name in msg and "corrupt" in msg and "backbone.pth" in msg

    with pytest.raises(CheckpointError) as err:  # an IResNet-18 checkpoint named as an IResNet-50
        torch_identity_encoder(str(_spec(folder, arch="iresnet50")))
    msg = _one_line(err)
    assert "arcface-iresnet18.pth" in msg and "torch_arch iresnet50" in msg and "torch_arch: iresnet18" in msg

    with pytest.raises(FileNotFoundError) as err:
        torch_identity_encoder(str(_spec(folder, pth="absent.pth")))
    assert "absent.pth" in _one_line(err)

    tree = yaml.safe_load(spec.read_text()) | {"torch_arch": "resnet50"}
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(SpecError) as err:
        load_spec(tmp_path / "typo.yaml")
    assert "torch_arch" in _one_line(err) and "iresnet50" in str(err.value)


def test_shipped_specs_load_and_name_the_checkpoint_to_download():
    for n in (50, 100):
        loaded = load_spec(SPECS_DIR / f"arcface-iresnet{n}.yaml", task="identity")
        s = loaded.spec
        assert (s.torch_arch, s.input.size, s.input.resize) == (f"iresnet{n}", 112, None)
        assert (s.input.mean, s.input.std, s.input.channel_order) == ((0.5,) * 3, (0.5,) * 3, "RGB")
        assert [o.kind for o in s.outputs] == ["embedding"] and loaded.torch_path.name == f"arcface-iresnet{n}.pth"
        with pytest.raises(FileNotFoundError, match=f"arcface-iresnet{n}.pth"):
            torch_identity_encoder(str(SPECS_DIR / f"arcface-iresnet{n}.yaml"))


@pytest.mark.slow  # 4 s: a micro MAUGen and a 100 MB encoder saved and loaded twice
def test_maugen_carries_the_iresnet_through_a_checkpoint(arcface, tmp_path):
    from test_maugen import MICRO

    from pipelines.maugen import MAUGenPipeline
    from pipelines.maugen.build import MAUGenConfig, build_pipeline, load_identity_encoder

    spec, _ = arcface
    pipe = build_pipeline(MAUGenConfig(**MICRO, patch_size=2), torch_identity_encoder(str(spec)), seed=0)
    assert isinstance(pipe.identity_encoder, IResNet)
    x = _to_unit(_faces(64, n=2))
    with torch.no_grad():
        before = mcore.embed_identity(pipe.identity_encoder, x)
    pipe.save_pretrained(tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["identity_encoder"] == ["core.iresnet", "IResNet"]
    for enc in (MAUGenPipeline.from_pretrained(tmp_path / "m").identity_encoder,
                load_identity_encoder(tmp_path / "m" / "identity_encoder")):  # fmt: skip
        assert isinstance(enc, IResNet)
        with torch.no_grad():
            assert torch.allclose(mcore.embed_identity(enc, x), before, atol=1e-5)
