"""ArcFace's IResNet (insightface `recognition/arcface_torch`), the real face recogniser MAUGen's identity
condition and identity loss can use in place of the puppet-domain IdentityNet.

The layers and their attribute names are those of arcface_torch's `backbones/iresnet.py`, so a published
`backbone.pth` (a plain state_dict) loads with `strict=True`: stem `conv1`/`bn1`/`prelu`, four stages
`layer1..4` of pre-activation basic blocks (`bn1, conv1, bn2, prelu, conv2(stride), bn3`, `downsample.0/1`
on a stage's first block), then `bn2`, `fc` (512 x 7 x 7 -> 512) and the `features` BatchNorm1d. The input
is a 112 x 112 RGB face scaled as arcface_torch does, (x / 255 - 0.5) / 0.5; the raw output is the 512-d
feature, which `forward` L2-normalises as IdentityNet does.

`forward` takes MAUGen's images, RGB in [-1, 1] at the model's `image_size`, and re-normalises them with the
config's `mean`/`std`/`channel_order` (the spec's `input:`); for arcface_torch's (0.5, 0.5, RGB) that is the
identity. Resizing and cropping to 112 is the caller's (`pipelines.maugen.core.embed_identity` reads
`image_size` and `resize` from the config), bilinear and differentiable, by core.resize.resize_crop as the
ONNX runtime pre-processes.

A diffusers `ModelMixin, ConfigMixin`, so a MAUGen checkpoint saves and reloads it as its `identity_encoder`
component (`["core.iresnet", "IResNet"]` in model_index.json); `load_iresnet` builds one from a `.pth`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

#: blocks per stage of arcface_torch's iresnet18/34/50/100 (backbones/iresnet.py)
ARCHS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}
WIDTHS: tuple[int, int, int, int] = (64, 128, 256, 512)
INPUT_SIZE = 112  # four stride-2 stages: 112 -> 7, the fc's 7 x 7


class CheckpointError(ValueError):
    """A missing, unreadable or mismatched checkpoint file, worded to name the file and the fix."""


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-5)


class IBasicBlock(nn.Module):
    """Pre-activation basic block: BN, 3x3 conv, BN, PReLU, 3x3 conv (carries the stride), BN, + shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.bn1 = _bn(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = _bn(out_ch)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn3 = _bn(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), _bn(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(ModelMixin, ConfigMixin):
    """Face (B, 3, image_size, image_size) in [-1, 1] -> L2-normalised ArcFace embedding (B, dim)."""

    @register_to_config
    def __init__(
        self,
        arch: str = "iresnet50",
        dim: int = 512,
        image_size: int = INPUT_SIZE,
        resize: int | None = None,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        channel_order: str = "RGB",
    ):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown IResNet arch {arch!r}: use one of {', '.join(ARCHS)}")
        if image_size != INPUT_SIZE:
            raise ValueError(f"an IResNet takes {INPUT_SIZE} x {INPUT_SIZE} faces (its fc is 7 x 7), not {image_size}")
        if channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be RGB or BGR, not {channel_order!r}")
        self.conv1 = nn.Conv2d(3, WIDTHS[0], 3, padding=1, bias=False)
        self.bn1 = _bn(WIDTHS[0])
        self.prelu = nn.PReLU(WIDTHS[0])
        in_ch = WIDTHS[0]
        for k, (n, w) in enumerate(zip(ARCHS[arch], WIDTHS), start=1):
            blocks = [IBasicBlock(in_ch if i == 0 else w, w, stride=2 if i == 0 else 1) for i in range(n)]
            setattr(self, f"layer{k}", nn.Sequential(*blocks))
            in_ch = w
        self.bn2 = _bn(in_ch)
        side = INPUT_SIZE // 16
        self.fc = nn.Linear(in_ch * side * side, dim)
        self.features = nn.BatchNorm1d(dim, eps=1e-5)

    def features_of(self, x: torch.Tensor) -> torch.Tensor:
        """arcface_torch's forward: a normalised 112 x 112 batch -> the raw (B, dim) feature (what its ONNX
        export returns)."""
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(torch.flatten(self.bn2(x), 1)))  # (arcface_torch: dropout p=0 here)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] RGB -> the model's input normalisation (config mean/std/channel_order)."""
        cfg = self.config
        if tuple(cfg.mean) == (0.5, 0.5, 0.5) and tuple(cfg.std) == (0.5, 0.5, 0.5) and cfg.channel_order == "RGB":
            return x
        x = x * 0.5 + 0.5
        if cfg.channel_order == "BGR":
            x = x.flip(1)
        mean = torch.tensor(cfg.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features_of(self.normalise(x)), dim=1)


def guess_arch(state: dict) -> str | None:
    """The arch whose blocks per stage match a state_dict's `layerK.i.` keys, if any."""
    counts = [0, 0, 0, 0]
    for key in state:
        m = re.match(r"layer([1-4])\.(\d+)\.", key)
        if m:
            k = int(m.group(1)) - 1
            counts[k] = max(counts[k], int(m.group(2)) + 1)
    return next((name for name, n in ARCHS.items() if tuple(counts) == n), None)


def load_iresnet(path: str | Path, arch: str, **config) -> IResNet:
    """A frozen, eval-mode IResNet of `arch` from an arcface_torch `backbone.pth` (a plain state_dict, loaded
    with strict=True). `config`: IResNet's input keys (resize, mean, std, channel_order). Every failure is
    one CheckpointError naming the file and the fix."""
    p = Path(path)
    fix = "point the identity spec's torch_weights at arcface_torch's backbone.pth"
    if not p.is_file():
        raise CheckpointError(f"identity encoder checkpoint {p} does not exist; {fix}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises several unrelated types for a bad file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(
            f"identity encoder checkpoint {p} is corrupt or not a PyTorch state_dict ({first[:200]}); "
            f"download it again, or {fix}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"identity encoder checkpoint {p} is not a plain state_dict of tensors; {fix}")
    fc = state.get("fc.weight")
    dim = int(fc.shape[0]) if fc is not None and fc.ndim == 2 else 512
    net = IResNet(arch=arch, dim=dim, **config)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        guess = guess_arch(state)
        if guess and guess != arch:
            hint = f"its layers fit {guess}: set torch_arch: {guess}"
        else:
            hint = f"is it an arcface_torch IResNet? {fix}"
        detail = str(err).strip().splitlines()[1:2] or [""]
        raise CheckpointError(
            f"identity encoder checkpoint {p} does not fit torch_arch {arch} ({detail[0].strip()[:160]}); {hint}"
        ) from None
    net.requires_grad_(False).eval()
    return net
