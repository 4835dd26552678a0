"""The generator interface of the generate stage, and the generators the config can select.

A generator turns a batch of expanded candidates into images and AU labels. It is owned by a
long-lived Ray actor (factory/actors.py) that loads it once. MAUGen is conditioned on each
candidate's exemplar and inpainting mask, which the shard runner reads from the build's identity
source (factory/identities.py) and sends with the batch; the puppet renderer needs neither.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from core.facs import NUM_AUS
from pipelines.prompts import TokenBudget
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
    identities: list[Any]  # PuppetIdentity or PoolIdentity (factory/identities.py)
    exemplars: np.ndarray | None = None  # uint8 (B, S, S, 3): what MAUGen is conditioned on
    masks: np.ndarray | None = None  # float32 (B, S, S): 1 where the face is generated

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
    image_size: int  # the corpus image size it makes
    needs_exemplars: bool
    #: Whether generating is the build's costly stage on a CPU, so that `auto` sizing runs one generator
    #: per core (factory/sizing.py); False for one that costs less than detecting what it makes.
    fills_cores: bool
    #: Whether it computes with torch: its actor sets torch's threads and quiets diffusers' output.
    uses_torch: bool

    def generate(self, batch: GenerationBatch) -> GenerationResult: ...


class PuppetGenerator:
    """The procedural renderer as a generator: it renders the target exactly (exact labels)."""

    name = "puppet"
    needs_exemplars = False
    fills_cores = False  # a few ms an image in numpy: its detection costs more (bench/bench_actor_busy.py)
    uses_torch = False

    def __init__(self, cfg: FactoryConfig):
        self.image_size = cfg.puppet.image_size
        self.renderer = PuppetRenderer(size=cfg.puppet.image_size, supersample=cfg.puppet.supersample)
        self.threshold = cfg.labels.occurrence_threshold
        self.version = _module_hash("pipelines.puppet.renderer", "pipelines.puppet.identity")

    def generate(self, batch: GenerationBatch) -> GenerationResult:
        if not all(isinstance(p, PuppetIdentity) for p in batch.identities):
            raise ValueError("generator=puppet renders puppet identities only; a pool of photos needs generator=maugen")
        images = self.renderer.render_batch(batch.identities, batch.target.astype(np.float32))
        intensity = batch.target.astype(np.float32)
        occ = (intensity >= self.threshold).astype(np.float32)
        return GenerationResult(images=images, intensity=intensity, occurrence_prob=occ)


class MAUGenGenerator:
    """MAUGen as the generate stage: prompt + the identity's exemplar and mask -> image and labels.

    It makes images at the size its checkpoint was trained at (its label decoder is sized for
    it); `build.image_size`, when set, must name that size. Each sample draws its noise from its
    own generator seeded by the sample's seed, so an image does not depend on which batch it
    landed in (resume produces the same bytes).
    """

    name = "maugen"
    needs_exemplars = True
    fills_cores = True
    uses_torch = True

    def __init__(self, cfg: FactoryConfig):
        import torch

        from pipelines.maugen import MAUGenPipeline
        from pipelines.maugen.build import set_scheduler
        from pipelines.maugen.builtin import checkpoint_hash, resolve_checkpoint
        from pipelines.maugen.speed import apply_speedups

        m = cfg.maugen
        path = resolve_checkpoint(m.checkpoint)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if m.device == "auto" else m.device
        dtype = getattr(torch, m.dtype)
        if device == "cpu" and dtype == torch.float16:
            raise ValueError(
                "maugen.dtype=float16 needs a GPU and this generator runs on the CPU; set maugen.dtype=bfloat16 or "
                "float32, or give the generator a GPU (runtime.generator_gpus)"
            )
        try:
            pipe = MAUGenPipeline.from_pretrained(path, dtype=dtype)
        except Exception as e:
            raise ValueError(
                f"maugen.checkpoint {path} could not be loaded ({type(e).__name__}: {e}); re-save it"
            ) from e
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        want = cfg.build.image_size
        if want is not None and native != want:  # its label decoder is sized for the trained resolution
            raise ValueError(
                f"maugen.checkpoint {path} was trained at {native} px but build.image_size is {want}; set "
                f"build.image_size={native} (or null: the checkpoint's size) or use a checkpoint trained at {want} px"
            )
        set_scheduler(pipe, m.scheduler)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device)
        apply_speedups(
            self.pipe,
            attention=m.attention,
            channels_last=m.channels_last,
            compile=m.compile,
            cache=m.cache,
            cache_skip=m.cache_skip,
        )
        self.device = device
        self.cfg = m
        self.image_size = native
        self.version = checkpoint_hash(path)[:12]

    def generate(self, batch: GenerationBatch) -> GenerationResult:
        b = len(batch)
        if batch.exemplars is None or batch.masks is None or len(batch.exemplars) != b or (
            batch.exemplars.shape[1] != self.image_size
        ):
            raise ValueError(
                f"MAUGen needs one {self.image_size} px exemplar and mask per sample in the batch (the shard runner "
                "reads them from the identity source)"
            )
        with warnings.catch_warnings():
            # the text encoder cuts prompts longer than it reads: a property of the checkpoint, which
            # the user of a build cannot act on (pipelines/maugen/core.py warns library users; -v shows it)
            if not os.environ.get("MIFA_VERBOSE"):
                warnings.filterwarnings("ignore", message="prompts longer than the text encoder", category=UserWarning)
            return self._sample(batch)

    def _sample(self, batch: GenerationBatch) -> GenerationResult:
        import torch

        b, step = len(batch), self.cfg.batch_size
        exemplars, masks = batch.exemplars, batch.masks
        images, occ, inten = [], [], []
        for a in range(0, b, step):
            sl = slice(a, min(b, a + step))
            gens = [torch.Generator(device=self.device).manual_seed(int(s)) for s in batch.seeds[sl]]
            out = self.pipe(
                list(batch.prompts[sl]),
                exemplars[sl],
                num_inference_steps=self.cfg.steps,
                guidance_scale=self.cfg.guidance_scale,
                guidance_interval=self.cfg.guidance_interval,
                generator=gens,
                mask_image=masks[sl],
                height=self.image_size,
                width=self.image_size,
                on_nonfinite="mark",  # a NaN sample is rejected as invalid_image; the rest of its batch is kept
            )
            images.append(out.images)
            occ.append(out.au_occurrence)
            inten.append(out.au_intensity)
        return GenerationResult(
            images=np.concatenate(images),
            intensity=np.concatenate(inten).astype(np.float32),
            occurrence_prob=np.concatenate(occ).astype(np.float32),
        )


GENERATORS: dict[str, type] = {"puppet": PuppetGenerator, "maugen": MAUGenGenerator}


@functools.lru_cache(maxsize=4)
def _budget_of(checkpoint: str) -> TokenBudget:
    from pipelines.maugen.builtin import resolve_checkpoint

    return TokenBudget.from_tokenizer(resolve_checkpoint(checkpoint) / "tokenizer")


def prompt_budget(cfg: FactoryConfig) -> TokenBudget | None:
    """The text-encoder limit every prompt of this build must fit: MAUGen's tokenizer and its positions;
    None for the puppet renderer, which reads labels, not text. One per checkpoint per process."""
    return _budget_of(cfg.maugen.checkpoint) if cfg.generator == "maugen" else None


def generator_class(cfg: FactoryConfig) -> type:
    """The class of the configured generator (its traits, without loading it)."""
    try:
        return GENERATORS[cfg.generator]
    except KeyError:
        raise ValueError(f"generator {cfg.generator!r} unknown; allowed: {', '.join(GENERATORS)}") from None


def make_generator(cfg: FactoryConfig) -> Generator:
    return generator_class(cfg)(cfg)


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
