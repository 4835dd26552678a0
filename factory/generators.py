"""The generator interface of the generate stage, and the generators the config can select.

A generator turns a batch of expanded candidates into images and AU labels. It is owned by a
long-lived Ray actor (see graph.py) that loads it once; MAUGen implements the same `generate`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pipelines.facs import NUM_AUS
from pipelines.puppet import PuppetIdentity, PuppetRenderer

from .config import FactoryConfig

log = logging.getLogger(__name__)


@dataclass
class GenerationBatch:
    """What the generate stage receives: one row per candidate."""

    keys: list[str]
    seeds: np.ndarray  # int64 (B,)
    prompts: list[str]
    target: np.ndarray  # int8 (B, 12) target intensities v_pre
    identities: list[PuppetIdentity]

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class GenerationResult:
    """Images and the generator's own AU labels for a batch, in the batch's order."""

    images: np.ndarray  # uint8 (B, H, W, 3)
    intensity: np.ndarray  # float32 (B, 12) on the 0-5 scale
    occurrence_prob: np.ndarray  # float32 (B, 12) in [0, 1]


class Generator(Protocol):
    name: str
    version: str

    def generate(self, batch: GenerationBatch) -> GenerationResult: ...


class PuppetGenerator:
    """The procedural renderer as a generator: it renders the target exactly (exact labels)."""

    name = "puppet"

    def __init__(self, cfg: FactoryConfig):
        self.renderer = PuppetRenderer(size=cfg.puppet.image_size, supersample=cfg.puppet.supersample)
        self.threshold = cfg.labels.occurrence_threshold
        self.version = _module_hash("pipelines.puppet.renderer", "pipelines.puppet.identity")

    def generate(self, batch: GenerationBatch) -> GenerationResult:
        images = self.renderer.render_batch(batch.identities, batch.target.astype(np.float32))
        intensity = batch.target.astype(np.float32)
        occ = (intensity >= self.threshold).astype(np.float32)
        return GenerationResult(images=images, intensity=intensity, occurrence_prob=occ)


GENERATORS: dict[str, type] = {"puppet": PuppetGenerator}


def make_generator(cfg: FactoryConfig) -> Generator:
    try:
        cls = GENERATORS[cfg.generator]
    except KeyError:
        raise ValueError(f"generator {cfg.generator!r} unknown; allowed: {', '.join(GENERATORS)}") from None
    return cls(cfg)


def validate_result(result: GenerationResult, batch: GenerationBatch, size: int) -> np.ndarray:
    """Per-sample validity of a generator's output; a malformed batch is an error naming the fix.

    Returns a bool mask: False for samples whose image or labels hold NaN/inf or a blank image.
    """
    b = len(batch)
    if result.images.shape != (b, size, size, 3):
        raise ValueError(
            f"generator returned images of shape {result.images.shape}, expected {(b, size, size, 3)}; "
            "check the generator's image size against the config"
        )
    for name in ("intensity", "occurrence_prob"):
        arr = getattr(result, name)
        if arr.shape != (b, NUM_AUS):
            raise ValueError(f"generator returned {name} of shape {arr.shape}, expected {(b, NUM_AUS)}")
    images = result.images
    if images.dtype != np.uint8:
        finite = np.isfinite(images).reshape(b, -1).all(axis=1)
    else:
        finite = np.ones(b, dtype=bool)
    finite &= np.isfinite(result.intensity).all(axis=1) & np.isfinite(result.occurrence_prob).all(axis=1)
    flat = images.reshape(b, -1).astype(np.float32)
    blank = np.nan_to_num(flat.std(axis=1), nan=0.0) < 1.0
    return finite & ~blank


def _module_hash(*modules: str) -> str:
    """Hash of the source of the modules that decide a generator's output (provenance)."""
    import importlib
    import inspect

    h = hashlib.sha256()
    for m in modules:
        h.update(inspect.getsource(importlib.import_module(m)).encode())
    return h.hexdigest()[:12]
