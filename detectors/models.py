"""The torch side of the tiny puppet-domain models: AU detectors, realism discriminator, identity encoder
(its architecture, `IdentityNet`, lives in core/identity_net.py, since MAUGen carries it too).

They are diffusers-style `ModelMixin, ConfigMixin` models, so `save_pretrained` / `from_pretrained`
round-trip them from a local folder. What runs inside the factory is their ONNX export (see
`detectors/train.py::export_onnx`); the torch weights stay next to it for the parity test, the ONNX-vs-torch
benchmark and the identity loss of MAUGen, which needs gradients through the encoder.

Three AU architectures on purpose: consensus is only worth something when the detectors fail
differently. `cnn` is a plain strided conv stack that keeps the spatial layout up to its linear
head; `resnet` is a ResNet built by transformers' `ResNetModel` constructor (no pretrained weights);
`vit` is a small Vision Transformer from transformers' `ViTModel`. The evaluation panel's AU evaluator,
`gncnn` (5x5 stem, average-pool downsampling, GroupNorm, SiLU), judges `factory eval` and is used by
neither MAUGen's training nor the build's filters. (A ConvNeXt was tried first for it and was too weak a
judge; detectors/models/README.md.) `IdentityResNet` is the
panel's identity evaluator, another architecture than the `IdentityNet` that MAUGen's identity loss uses.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from core.facs import INTENSITY_MAX, NUM_AUS
# IdentityNet is defined in core; re-exported here so old checkpoints naming ["detectors.models", "IdentityNet"] load
from core.identity_net import IdentityNet, conv_stack  # noqa: F401

AUArch = Literal["cnn", "resnet", "vit", "gncnn"]
AU_ARCHS: tuple[str, ...] = ("cnn", "resnet", "vit", "gncnn")


def gn_conv_stack(widths: list[int]) -> nn.Sequential:
    """A 5x5 stem, then 2x average pooling + 3x3 conv per stage, each with GroupNorm and SiLU: a plain conv
    stack that differs from `conv_stack` (3x3 strided convs, BatchNorm, ReLU) in every layer type."""
    layers: list[nn.Module] = []
    in_ch = 3
    for i, w in enumerate(widths):
        if i:
            layers.append(nn.AvgPool2d(2))
        layers += [nn.Conv2d(in_ch, w, 5 if i == 0 else 3, padding=2 if i == 0 else 1), nn.GroupNorm(4, w), nn.SiLU()]
        in_ch = w
    return nn.Sequential(*layers)


def tiny_resnet(width: int) -> nn.Module:
    """transformers' `ResNetModel`, basic blocks, one per stage, widths width/2 .. 4*width, random init."""
    from transformers import ResNetConfig, ResNetModel

    rc = ResNetConfig(
        num_channels=3,
        embedding_size=width // 2,
        hidden_sizes=[width // 2, width, 2 * width, 4 * width],
        depths=[1, 1, 1, 1],
        layer_type="basic",
    )
    return ResNetModel(rc)


class AUDetectorNet(ModelMixin, ConfigMixin):
    """Image (normalised NCHW) -> occurrence logits (B, 12) and intensity on 0-5 (B, 12)."""

    @register_to_config
    def __init__(
        self, arch: AUArch = "cnn", image_size: int = 64, num_aus: int = NUM_AUS, width: int = 32, upsample: int = 1
    ):
        super().__init__()
        if arch not in AU_ARCHS:
            raise ValueError(f"AU detector arch must be one of {AU_ARCHS}, got {arch!r}")
        if arch == "cnn":
            widths = [width // 2, width, width, 2 * width, 2 * width]
            self.backbone = conv_stack(widths)
            side = image_size // 2 ** (len(widths) - 1)
            self.reduce = nn.Sequential(nn.Conv2d(widths[-1], 16, 1), nn.ReLU(inplace=True))
            feat = 16 * side * side
        elif arch == "resnet":
            self.backbone = tiny_resnet(width)
            feat = 4 * width
        elif arch == "vit":
            from transformers import ViTConfig, ViTModel

            vc = ViTConfig(
                image_size=image_size,
                patch_size=8,
                num_channels=3,
                hidden_size=3 * width,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=6 * width,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            )
            self.backbone = ViTModel(vc, add_pooling_layer=False)
            # every patch token, narrowed, goes to the head: where a cue sits matters for AUs, and a
            # CLS token alone trains far too slowly from scratch on a few thousand images
            self.reduce = nn.Sequential(nn.Linear(3 * width, 8), nn.GELU())
            feat = 8 * (image_size // 8) ** 2
        elif arch == "gncnn":
            self.backbone = gn_conv_stack([width // 2, width, width, 2 * width, 2 * width])
            self.reduce = nn.Sequential(nn.Conv2d(2 * width, 16, 1), nn.SiLU())
            feat = 16 * (image_size // 16) ** 2
        self.head = nn.Sequential(nn.Linear(feat, 128), nn.ReLU(inplace=True), nn.Linear(128, 2 * num_aus))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        arch = self.config.arch
        if self.config.upsample > 1:
            # ResNet's stem divides the side by 4 at once; upsampling first keeps lip-corner detail
            x = F.interpolate(x, scale_factor=self.config.upsample, mode="bilinear", align_corners=False)
        if arch in ("cnn", "gncnn"):
            return self.reduce(self.backbone(x)).flatten(1)
        if arch == "resnet":
            return self.backbone(pixel_values=x).pooler_output.flatten(1)
        h = self.backbone(pixel_values=x).last_hidden_state
        return self.reduce(h[:, 1:]).flatten(1)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's global-average-pooled last stage (B, C): what the Frechet feature network
        `eval-au-gap` reads."""
        if self.config.arch != "gncnn":
            raise ValueError(f"pooled features are defined for the evaluator (gncnn), not {self.config.arch!r}")
        return self.backbone(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.features(x))
        n = self.config.num_aus
        logits, raw_int = out[:, :n], out[:, n:]
        return logits, INTENSITY_MAX * torch.sigmoid(raw_int)


class IdentityResNet(ModelMixin, ConfigMixin):
    """Image -> L2-normalised identity embedding (B, dim) from transformers' `ResNetModel`: the evaluation
    panel's identity evaluator, so identity similarity is not judged by the encoder MAUGen's loss trained on."""

    @register_to_config
    def __init__(self, image_size: int = 64, width: int = 32, dim: int = 64, upsample: int = 2):
        super().__init__()
        self.backbone = tiny_resnet(width)
        self.head = nn.Linear(4 * width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.upsample > 1:
            x = F.interpolate(x, scale_factor=self.config.upsample, mode="bilinear", align_corners=False)
        return F.normalize(self.head(self.backbone(pixel_values=x).pooler_output.flatten(1)), dim=1)


class RealismNet(ModelMixin, ConfigMixin):
    """Image -> realism logit (B,): a plausible, intact puppet face vs degraded, off-domain or broken."""

    @register_to_config
    def __init__(self, image_size: int = 64, width: int = 24):
        super().__init__()
        widths = [width // 2, width, width, 2 * width, 2 * width]
        self.backbone = conv_stack(widths)
        side = image_size // 2 ** (len(widths) - 1)
        self.head = nn.Sequential(
            nn.Conv2d(widths[-1], 8, 1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(8 * side * side, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))[:, 0]


class ArcFaceHead(nn.Module):
    """Additive angular margin softmax (Deng et al. 2019), the metric-learning loss of the encoder.

    Training only: the class centres are the training identities, not part of the exported model.
    """

    def __init__(self, dim: int, num_classes: int, scale: float = 24.0, margin: float = 0.3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        self.scale = scale
        self.margin = margin

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = F.linear(emb, F.normalize(self.weight, dim=1)).clamp(-1 + 1e-6, 1 - 1e-6)
        theta = torch.acos(cos)
        target = torch.cos(theta + self.margin)
        onehot = F.one_hot(labels, cos.shape[1]).bool()
        logits = torch.where(onehot, target, cos) * self.scale
        return F.cross_entropy(logits, labels)
