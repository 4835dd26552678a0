"""Named feature networks for Frechet distances between image sets (FID-style).

A Frechet distance is only comparable between runs that use the same feature network and
pre-processing (docs/facs.md), so each network here has a fixed name that reports carry. No Inception
weights can be downloaded here; the embedded networks are our own puppet-domain models:

    eval-au-gap          the evaluation panel's AU evaluator (builtin:eval-au): its backbone's global
                         average pool of the last stage (64-d). Neither MAUGen's training nor a build's
                         filters use it, so `factory eval` measures with it by default.
    puppet-realism-gap   the realism discriminator's conv backbone (torch weights of builtin:realism);
                         global average pools of its last two stages (128-d). The build filters with this
                         model, so a distance measured by it is not independent of the corpus selection.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from .builtin import resolve
from .spec import Task, load_spec

#: name -> (the model whose torch weights it reads, that model's task)
FEATURE_NETWORKS: dict[str, tuple[str, Task]] = {
    "eval-au-gap": ("builtin:eval-au", "au_detector"),
    "puppet-realism-gap": ("builtin:realism", "realism"),
}


class FeatureNetwork:
    """uint8 (B, H, W, 3) images -> float64 (B, d) features, by a named network."""

    def __init__(self, name: str = "eval-au-gap", batch_size: int = 256):
        if name not in FEATURE_NETWORKS:
            raise ValueError(f"unknown feature network {name!r}; available: {', '.join(FEATURE_NETWORKS)}")
        ref, task = FEATURE_NETWORKS[name]
        spec = load_spec(resolve(ref), task=task)
        if spec.torch_path is None or not spec.torch_path.is_dir():
            raise FileNotFoundError(
                f"feature network {name} needs the torch weights of {ref} ({spec.torch_path}); "
                f"rebuild them with `factory detectors train {ref.removeprefix('builtin:')}`"
            )
        self.name = name
        self.ref = ref
        self.spec = spec
        self.batch_size = batch_size
        self.mean = np.asarray(spec.spec.input.mean, dtype=np.float32)
        self.std = np.asarray(spec.spec.input.std, dtype=np.float32)
        self._features, self.size = _realism_gap(spec.torch_path) if task == "realism" else _eval_au_gap(spec.torch_path)

    def describe(self) -> dict[str, Any]:
        """Provenance, in the shape of the ONNX models' describe(): the weights' source model."""
        from .spec import file_sha256

        return {
            "task": "feature_network",
            "name": self.name,
            "spec": str(self.spec.path),
            "model": str(self.spec.model_path),
            "sha256": file_sha256(self.spec.model_path),
        }

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
                out.append(self._features(x).double().numpy())
        return np.concatenate(out)


def _eval_au_gap(weights: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    from .models import AUDetectorNet

    net = AUDetectorNet.from_pretrained(weights).eval()
    return net.pooled, int(net.config.image_size)


def _realism_gap(weights: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    from .models import RealismNet

    net = RealismNet.from_pretrained(weights).eval()
    backbone = net.backbone
    # the last two stages' outputs (conv, BN, ReLU triples): ReLU modules at -4 and -1
    taps = (len(backbone) - 4, len(backbone) - 1)

    def features(x: torch.Tensor) -> torch.Tensor:
        pooled = []
        for i, layer in enumerate(backbone):
            x = layer(x)
            if i in taps:
                pooled.append(x.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)

    return features, int(net.config.image_size)
