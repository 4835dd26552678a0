"""The identity encoder's architecture, shared by the detectors (which train and export it) and MAUGen
(which carries it as its `identity_encoder` component and takes its identity loss through it).

A diffusers-style `ModelMixin, ConfigMixin` model, so `save_pretrained` / `from_pretrained` round-trip
it and a MAUGen checkpoint's model_index.json names it `["core.identity_net", "IdentityNet"]`. The
real-domain encoder, ArcFace's IResNet, is core/iresnet.py; `load_identity_encoder` loads either.
These two and core/resize.py are the only modules of core/ that import torch: `import core.facs`
stays numpy-only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def conv_stack(widths: list[int], in_ch: int = 3) -> nn.Sequential:
    """3x3 conv + BN + ReLU, stride 2 from the second block on (64 px -> 64 / 2**(n-1))."""
    layers: list[nn.Module] = []
    for i, w in enumerate(widths):
        layers += [
            nn.Conv2d(in_ch, w, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
        ]
        in_ch = w
    return nn.Sequential(*layers)


class IdentityNet(ModelMixin, ConfigMixin):
    """Image -> L2-normalised identity embedding (B, dim), trained with an ArcFace margin loss."""

    @register_to_config
    def __init__(self, image_size: int = 64, width: int = 32, dim: int = 64):
        super().__init__()
        widths = [width // 2, width, width, 2 * width, 2 * width]
        self.backbone = conv_stack(widths)
        side = image_size // 2 ** (len(widths) - 1)
        self.head = nn.Sequential(
            nn.Conv2d(widths[-1], 16, 1),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(16 * side * side, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1)


def load_identity_encoder(weights: str | Path, arch: str | None = None, **config) -> nn.Module:
    """The frozen, eval-mode identity encoder from an identity spec's `torch_weights`.

    With `arch` (the spec's `torch_arch`, e.g. iresnet50) `weights` is an arcface_torch `backbone.pth` and
    `config` the spec's input keys (core.iresnet.load_iresnet); without, a diffusers-format folder of an
    IdentityNet or IResNet (what a MAUGen checkpoint saves as its `identity_encoder`).
    """
    from .iresnet import IResNet, load_iresnet

    path = Path(weights)
    if arch is not None:
        return load_iresnet(path, arch, **config)
    if path.is_file() and path.suffix in (".pth", ".pt"):
        raise FileNotFoundError(
            f"identity encoder: {path} is a checkpoint file; name its architecture in the spec "
            "(torch_arch: iresnet50, iresnet100, ...) to load it"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"identity encoder: {path} is not a saved IdentityNet or IResNet (no config.json)")
    name = json.loads((path / "config.json").read_text()).get("_class_name")
    enc = (IResNet if name == "IResNet" else IdentityNet).from_pretrained(path)
    enc.requires_grad_(False).eval()
    return enc
