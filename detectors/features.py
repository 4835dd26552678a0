"""Named feature networks for Frechet distances between image sets (FID-style).

A Frechet distance is only comparable between runs that use the same feature network and
pre-processing (docs/facs.md), so each network here has a fixed name that reports carry. No Inception
weights can be downloaded here; the embedded networks are our own puppet-domain models:

    puppet-realism-gap   the realism discriminator's conv backbone (torch weights of
                         builtin:realism); global average pools of its last two stages (128-d)
"""

from __future__ import annotations

import numpy as np
import torch

from .builtin import resolve
from .spec import load_spec

FEATURE_NETWORKS: tuple[str, ...] = ("puppet-realism-gap",)


class FeatureNetwork:
    """uint8 (B, H, W, 3) images -> float64 (B, d) features, by a named network."""

    def __init__(self, name: str = "puppet-realism-gap", batch_size: int = 256):
        if name not in FEATURE_NETWORKS:
            raise ValueError(f"unknown feature network {name!r}; available: {', '.join(FEATURE_NETWORKS)}")
        from .models import RealismNet

        spec = load_spec(resolve("builtin:realism"), task="realism")
        if spec.torch_path is None or not spec.torch_path.is_dir():
            raise FileNotFoundError(
                f"feature network {name} needs the realism model's torch weights ({spec.torch_path}); "
                "rebuild them with `factory detectors train realism`"
            )
        net = RealismNet.from_pretrained(spec.torch_path).eval()
        self.backbone = net.backbone
        self.size = int(net.config.image_size)
        self.mean = np.asarray(spec.spec.input.mean, dtype=np.float32)
        self.std = np.asarray(spec.spec.input.std, dtype=np.float32)
        self.name = name
        self.batch_size = batch_size
        # the last two stages' outputs (conv, BN, ReLU triples): ReLU modules at -4 and -1
        self._taps = [len(self.backbone) - 4, len(self.backbone) - 1]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"feature network {self.name}: expected uint8 (B, H, W, 3), got {images.dtype} {images.shape}"
            )
        out = []
        with torch.no_grad():
            for a in range(0, len(images), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[a : a + self.batch_size])).float().div_(255.0)
                x = ((x - torch.from_numpy(self.mean)) / torch.from_numpy(self.std)).permute(0, 3, 1, 2)
                if x.shape[-1] != self.size:
                    x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
                pooled = []
                for i, layer in enumerate(self.backbone):
                    x = layer(x)
                    if i in self._taps:
                        pooled.append(x.mean(dim=(2, 3)))
                out.append(torch.cat(pooled, dim=1).double().numpy())
        return np.concatenate(out)
