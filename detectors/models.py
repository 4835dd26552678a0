"""The torch side of the tiny puppet-domain models: AU detectors, realism discriminator, identity encoder
(its architecture, `IdentityNet`, lives in core/identity_net.py, since MAUGen carries it too).

They are diffusers-style `ModelMixin, ConfigMixin` models, so `save_pretrained` / `from_pretrained`
round-trip them from a local folder. What runs inside the factory is their ONNX export (see
`detectors/train.py::export_onnx`); the torch weights stay next to it for the parity test, the ONNX-vs-torch
benchmark and the identity loss of MAUGen, which needs gradients through the encoder.

Three AU architectures on purpose: consensus is only worth something when the detectors fail
differently. `cnn` is a plain strided conv stack that keeps the spatial layout up to its linear
head; `resnet` is a ResNet built by transformers' `ResNetModel` constructor (no pretrained weights);
`vit` is a small Vision Transformer from transformers' `ViTModel`.
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

AUArch = Literal["cnn", "resnet", "vit"]
AU_ARCHS: tuple[str, ...] = ("cnn", "resnet", "vit")


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
            from transformers import ResNetConfig, ResNetModel

            rc = ResNetConfig(
                num_channels=3,
                embedding_size=width // 2,
                hidden_sizes=[width // 2, width, 2 * width, 4 * width],
                depths=[1, 1, 1, 1],
                layer_type="basic",
            )
            self.backbone = ResNetModel(rc)
            feat = 4 * width
        else:
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
        self.head = nn.Sequential(nn.Linear(feat, 128), nn.ReLU(inplace=True), nn.Linear(128, 2 * num_aus))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        arch = self.config.arch
        if self.config.upsample > 1:
            # ResNet's stem divides the side by 4 at once; upsampling first keeps lip-corner detail
            x = F.interpolate(x, scale_factor=self.config.upsample, mode="bilinear", align_corners=False)
        if arch == "cnn":
            return self.reduce(self.backbone(x)).flatten(1)
        if arch == "resnet":
            return self.backbone(pixel_values=x).pooler_output.flatten(1)
        h = self.backbone(pixel_values=x).last_hidden_state
        return self.reduce(h[:, 1:]).flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.features(x))
        n = self.config.num_aus
        logits, raw_int = out[:, :n], out[:, n:]
        return logits, INTENSITY_MAX * torch.sigmoid(raw_int)


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
