"""`factory train --config maugen.yaml`: MAUGen training with every loss term, checkpoints and resume.

Why it is built this way:
- Accelerate runs the same loop on a CPU, one GPU, or several (`accelerate launch -m factory.cli
  train ...`), with fp16/bf16 mixed precision. The forward goes through the pipeline's own
  modules (hooks, the shared `core.forward`), not a DDP wrapper, so with several processes the
  gradients are averaged with an explicit all-reduce after backward; each process draws its own
  batches and only the main process writes logs and checkpoints.
- Batches are drawn by a generator seeded with (seed, step), so a resumed run draws the batches
  the interrupted run would have drawn, without saving sampler state.
- Mutual conditioning in training: with probability `mutual_train_prob`, a no-grad pass at the
  preceding (noisier) timestep t + gap, same noise, gives final-layer AU tokens; their EMA with
  the learned queries, detached, is C_AU(t-1) and the initial queries of the grad pass at t. The
  other steps use the learned (language-initialised) queries, which is how those get gradient.
- Checkpoints are `OUT/checkpoints/step-NNNNNNN/` (the pipeline via save_pretrained, and
  `trainer.pt`); `COMPLETE` is written last and only complete checkpoints are resumed from.
- Every loss term and every adaptive weight goes to `OUT/train_log.jsonl` and the log.
- `on_save` hears every pipeline folder saved (checkpoints and final): `factory train` puts the
  training subjects' identity embeddings there (`training_subjects.npz`, factory/leakage.py), so a
  build can measure how close its faces come to the people the model was trained on.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from pipelines.overrides import apply_override, format_validation_error
from pipelines.prompts.budget import TokenBudget

from . import core, losses
from .build import MAUGenConfig, build_pipeline
from .pipeline import MAUGenPipeline


if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

log = logging.getLogger(__name__)

LOSS_NAMES: tuple[str, ...] = ("denoise", "text_au", "image_label", "identity", "clip")

#: The paper's Table 3 rows as config overrides (`factory train --ablation NAME`); "full" is the model.
ABLATIONS: dict[str, tuple[str, ...]] = {
    "full": (),
    "no-cld": ("model.label_branch=pooled",),
    "no-idm": ("model.use_idm=false",),
    "no-modulation-mask": ("model.use_modulation_mask=false",),
    "no-residual-filter": ("model.use_residual_filter=false",),
    "no-mutual-conditioning": ("model.mutual_conditioning=false",),
    "no-language-init": ("model.language_init=false",),
    "no-lgfe": ("model.use_lgfe=false",),
    "no-image-label-loss": ("losses.image_label=false",),
}


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["puppet", "disfa", "bp4d"] = "puppet"
    root: str | None = Field(None, description="dataset root for disfa / bp4d")
    samples: int = Field(4000, gt=0, description="puppet: rendered training samples")
    people: int = Field(200, gt=0, description="puppet: training identities")
    split: Literal["train", "heldout"] = "train"
    fold: int | None = Field(None, description="disfa / bp4d: 3-fold subject split (0, 1, 2); None = all subjects")
    part: Literal["train", "test"] = "train"
    every: int = Field(1, ge=1, description="disfa / bp4d: keep every n-th frame")
    seed: int = 0
    workers: int = Field(2, ge=1)


class LossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    denoise: bool = True
    text_au: bool = True
    image_label: bool = True
    identity: bool = True
    clip: bool = Field(True, description="used only when clip_model is set; skipped with a logged reason otherwise")
    clip_model: str | None = Field(
        None, description="local directory of a transformers CLIPModel (image + text encoders)"
    )
    adaptive: bool = Field(True, description="eq. 11 adaptive weights; off: fixed `weights`")
    adaptive_every: int = Field(
        1, ge=1, description="recompute eq. 11 every n steps (gradient norms cost one partial backward per term)"
    )
    weights: dict[str, float] = Field(
        default_factory=dict, description="fixed weights when adaptive is off (default 1)"
    )
    detectors: list[str] = Field(
        default_factory=lambda: ["builtin:au-cnn", "builtin:au-resnet", "builtin:au-vit"],
        description="AU detectors whose consensus the image-label loss uses",
    )
    min_agree: int = 2
    cfg_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="classifier-free guidance: drop the whole condition")
    mutual_train_prob: float = Field(0.5, ge=0.0, le=1.0)
    mutual_gap: int = Field(40, ge=1, description="timesteps between the no-grad pass and the grad pass")
    feature_weight: float = Field(
        0.0,
        ge=0.0,
        description="extra denoising-loss weight on the facial features (FaceSample.features: each feature "
        "weighs as much as any other, whatever its area); the weights inside the face are 1 + this times the "
        "map. Needs data whose features are known exactly (data.kind=puppet)",
    )


class TrainConfig(BaseModel):
    """Everything `factory train` needs; loaded from YAML, overridable with --set key=value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: str = "runs/maugen"
    model: MAUGenConfig = MAUGenConfig()
    data: DataConfig = DataConfig()
    losses: LossConfig = LossConfig()
    init_from: str | None = Field(
        None, description="start from a saved MAUGenPipeline directory instead of fresh weights"
    )
    steps: int = Field(2000, gt=0)
    stop_at: int | None = Field(
        None,
        gt=0,
        description="end the run at this step (OUT/final holds its weights) while the learning-rate schedule "
        "still follows `steps`: a run stopped here equals the longer run up to this step",
    )
    batch_size: int = Field(16, gt=0)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = 0.0
    warmup: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="EMA of the trained weights (diffusers EMAModel, warm-up 1-(1+step)^-2/3 up to this decay); "
        "0 = off. The saved pipelines (final, checkpoints/*/pipeline-ema) carry the EMA weights",
    )
    train_text_encoder: bool = Field(True, description="tiny models train their text encoder; SD keeps CLIP frozen")
    checkpoint_every: int = Field(500, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, gt=0)
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = torch's default)")

    @model_validator(mode="after")
    def _stop_within_the_schedule(self) -> TrainConfig:
        if self.stop_at is not None and self.stop_at > self.steps:
            raise ValueError(f"stop_at={self.stop_at} is past steps={self.steps}: raise steps or lower stop_at")
        return self

    @model_validator(mode="after")
    def _features_known(self) -> TrainConfig:
        if self.losses.feature_weight > 0 and self.data.kind != "puppet":
            raise ValueError(
                f"losses.feature_weight={self.losses.feature_weight} needs exact facial-feature masks, which "
                f"data.kind={self.data.kind} does not have: set losses.feature_weight=0"
            )
        return self


def load_train_config(
    path: str | Path | None, overrides: list[str] | None = None, ablation: str | None = None
) -> TrainConfig:
    """YAML file (optional) + a Table 3 ablation + `key.sub=value` overrides -> TrainConfig.

    An ablation run writes to `<out>-<ablation>` unless `out` is overridden; errors name the key and the file.
    """
    raw: dict = {}
    if ablation is not None and ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; the Table 3 rows are: {', '.join(ABLATIONS)}")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"training config {p} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"training config {p} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"training config {p} must be a mapping at the top level")
    if ablation is not None:
        overrides = [*ABLATIONS[ablation], *(overrides or [])]
        if ablation != "full" and not any(o.startswith("out=") for o in overrides):
            overrides.append(f"out={raw.get('out', TrainConfig().out)}-{ablation}")
    for item in overrides or []:
        apply_override(raw, item, example="steps=100")  # an OverrideError is a ValueError naming the --set
    try:
        return TrainConfig(**raw)
    except ValidationError as e:
        where = f" in {path}" if path else ""
        raise ValueError(format_validation_error(e, TrainConfig, prefix=f"training config error{where}")) from None


def make_dataset(cfg: DataConfig, image_size: int, budget: TokenBudget | None = None):
    """The training dataset the config names (all yield `FaceSample`); prompts within `budget`."""
    from . import data

    if cfg.kind == "puppet":
        return data.PuppetFaceDataset(
            cfg.samples, cfg.people, split=cfg.split, seed=cfg.seed, size=image_size, workers=cfg.workers, budget=budget
        )
    if cfg.root is None:
        raise ValueError(f"data.root is required for data.kind={cfg.kind} (the dataset's folder)")
    if cfg.kind == "disfa":
        return data.DisfaDataset(
            cfg.root, fold=cfg.fold, part=cfg.part, size=image_size, every=cfg.every, budget=budget
        )
    subjects = None if cfg.fold is None else data.bp4d_split(cfg.fold, cfg.part)
    return data.BP4DDataset(cfg.root, subjects=subjects, size=image_size, every=cfg.every, budget=budget)


def subject_exemplars(cfg: DataConfig, image_size: int) -> list[tuple[str, np.ndarray]]:
    """(subject id, exemplar image) of every training subject the config's dataset shows, at `image_size`:
    what `make_dataset(cfg, image_size).subject_exemplars()` returns, without rendering puppet samples."""
    from . import data

    if cfg.kind == "puppet":
        return data.puppet_subjects(cfg.samples, cfg.people, cfg.split, cfg.seed, image_size, cfg.workers)
    return make_dataset(cfg, image_size).subject_exemplars()


class MAUGenModules(nn.Module):
    """The trained parts in one module (what the optimiser and DDP see)."""

    def __init__(self, pipe: MAUGenPipeline, train_text_encoder: bool):
        super().__init__()
        self.unet = pipe.unet
        self.conditioner = pipe.conditioner
        self.label_decoder = pipe.label_decoder
        self.text_encoder = pipe.text_encoder
        self.text_encoder.requires_grad_(train_text_encoder)
        pipe.identity_encoder.requires_grad_(False)
        if pipe.vae is not None:
            pipe.vae.requires_grad_(False)


class Trainer:
    """One training run (see the module docstring)."""

    def __init__(
        self,
        cfg: TrainConfig,
        dataset=None,
        log_to_file: bool = True,
        on_save: Callable[[Path], None] | None = None,
    ):
        from accelerate import Accelerator

        self.cfg = cfg
        #: called with every pipeline folder saved (checkpoints' pipeline and pipeline-ema, final) before it is
        #: renamed into place: `factory train` writes the training subjects' embeddings beside the weights
        self.on_save = on_save
        self.out = Path(cfg.out)
        self.log_to_file = log_to_file
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
        self.device = self.accelerator.device
        torch.manual_seed(cfg.seed)
        if cfg.init_from:
            self.pipe = MAUGenPipeline.from_pretrained(cfg.init_from)
            if cfg.model.reference and not self.pipe.reference:
                core.add_reference_channels(self.pipe.unet, self.pipe.latent_channels)
                log.info("model.reference: %s's UNet now also reads the whole exemplar (new channels start at 0)", cfg.init_from)
        else:
            from detectors.builtin import torch_identity_encoder

            self.pipe = build_pipeline(cfg.model, torch_identity_encoder(cfg.model.identity_encoder), seed=cfg.seed)
        self.pipe.to(self.device)
        self.noise_scheduler = _ddpm(self.pipe.scheduler)
        self.alphas = self.noise_scheduler.alphas_cumprod.to(self.device)
        self.dataset = dataset if dataset is not None else make_dataset(cfg.data, self._image_size(), self._budget())
        if len(self.dataset) < cfg.batch_size:
            raise ValueError(f"the dataset has {len(self.dataset)} samples, fewer than batch_size={cfg.batch_size}")
        self.modules = MAUGenModules(self.pipe, cfg.train_text_encoder)
        params = [p for p in self.modules.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.params = params
        self.optimizer = self.accelerator.prepare(self.optimizer)
        self.ema = self._new_ema()
        self.mrl_conv = losses.mrl_last_conv(self.pipe.unet)
        self.active = self._active_losses()
        self.panel = None
        self._consensus_cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        if "image_label" in self.active:
            from detectors.panel import DetectorPanel

            self.panel = DetectorPanel(cfg.losses.detectors, cfg.losses.min_agree, realism=None, threads=1)
        self.clip = self._load_clip() if "clip" in self.active else None
        self.weights = {k: 1.0 / len(self.active) for k in self.active}
        self.step = 0

    # ------------------------------------------------------------------ set-up helpers

    def _budget(self) -> TokenBudget:
        """Training prompts fit the text encoder being trained (a build's expander fits the same one)."""
        tok = self.pipe.tokenizer
        return TokenBudget(tok, int(tok.model_max_length))

    def _image_size(self) -> int:
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def _lr_factor(self, step: int) -> float:
        w = self.cfg.warmup
        if w and step < w:
            return (step + 1) / w
        rest = max(1, self.cfg.steps - w)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - w) / rest))) * 0.9 + 0.1

    def _active_losses(self) -> list[str]:
        lc = self.cfg.losses
        active = [n for n in LOSS_NAMES if getattr(lc, n)]
        if "clip" in active and not lc.clip_model:
            log.info("directional CLIP loss skipped: no CLIP image/text encoders given (losses.clip_model is unset)")
            active.remove("clip")
        if not active:
            raise ValueError("every loss term is switched off; enable at least losses.denoise")
        return active

    def _load_clip(self):
        from transformers import AutoTokenizer, CLIPModel

        path = Path(self.cfg.losses.clip_model)
        if not path.is_dir():
            raise FileNotFoundError(f"losses.clip_model {path} is not a directory with a transformers CLIPModel")
        model = CLIPModel.from_pretrained(path).to(self.device).requires_grad_(False).eval()
        tok = AutoTokenizer.from_pretrained(path)
        return model, tok

    # ------------------------------------------------------------------ batches

    def batch_indices(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.cfg.seed, step, self.accelerator.process_index])
        return rng.choice(len(self.dataset), size=self.cfg.batch_size, replace=False)

    def make_batch(self, indices) -> dict:
        from .data import collate

        samples = [self.dataset[int(i)] for i in indices]
        batch = collate(samples)
        batch["index"] = [int(i) for i in indices]
        if self.panel is not None:
            occ, inten, agree = self._consensus(batch["index"], samples)
            batch["consensus_occurrence"] = torch.from_numpy(occ)
            batch["consensus_intensity"] = torch.from_numpy(inten)
            batch["consensus_agree"] = torch.from_numpy(agree)
        return batch

    def _consensus_key(self) -> str:
        """What the cached consensus of sample i depends on: which image i is, and who votes."""
        c = self.cfg
        return json.dumps(
            [c.data.model_dump(mode="json", exclude={"workers"}), c.model.image_size, c.losses.detectors,
             c.losses.min_agree],
            sort_keys=True,
        )

    def _consensus(self, indices: list[int], samples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Detector consensus on the training images (cached per sample: the images never change)."""
        todo = [j for j, i in enumerate(indices) if i not in self._consensus_cache]
        if todo:
            det = self.panel.detect(np.stack([samples[j].image for j in todo]))
            c = det.consensus
            for r, j in enumerate(todo):
                self._consensus_cache[indices[j]] = (
                    c.occurrence[r].astype(np.float32),
                    c.intensity[r].astype(np.float32),
                    c.agree[r].copy(),
                )
        rows = [self._consensus_cache[i] for i in indices]
        return tuple(np.stack(x) for x in zip(*rows))  # type: ignore[return-value]

    # ------------------------------------------------------------------ one step

    def compute_losses(
        self,
        batch: dict,
        generator: torch.Generator | None = None,
        timesteps: torch.Tensor | None = None,
        train: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Every active loss term of one batch (the graph is kept for backward and eq. 11)."""
        pipe, dev = self.pipe, self.device
        lc = self.cfg.losses
        x0 = batch["image"].to(dev)
        exemplar = batch["exemplar"].to(dev)
        mask = batch["mask"].to(dev)
        b = x0.shape[0]
        with torch.no_grad():
            id_emb = core.embed_identity(pipe.identity_encoder, exemplar)
            z0 = pipe.encode_images(x0, generator=generator)  # a VAE's latent is drawn from the step's seed
            masked = pipe.image_condition(exemplar, mask) if pipe.inpainting else None
        mask_l = core.latent_mask(mask, z0.shape[-2:])
        ctx = torch.enable_grad() if (train and self.cfg.train_text_encoder) else torch.no_grad()
        with ctx:
            text, text_mask = core.encode_prompt(pipe.tokenizer, pipe.text_encoder, batch["prompt"], dev)
            null_text, _ = core.encode_prompt(pipe.tokenizer, pipe.text_encoder, [""], dev)
        cond = core.Condition(text, text_mask, id_emb)
        g = generator
        noise = torch.randn(z0.shape, generator=g, device="cpu").to(dev)
        T = self.noise_scheduler.config.num_train_timesteps
        t = timesteps.to(dev) if timesteps is not None else torch.randint(0, T, (b,), generator=g).to(dev)
        z_t = self.noise_scheduler.add_noise(z0, noise, t)
        drop = (
            (torch.rand(b, generator=g) < lc.cfg_dropout).to(dev)
            if train
            else torch.zeros(b, dtype=torch.bool, device=dev)
        )
        keep = ~drop

        queries = None
        ld = pipe.label_decoder
        if ld.config.mutual_conditioning and train and float(torch.rand(1, generator=g)) < lc.mutual_train_prob:
            queries = self.previous_au_queries(z0, noise, t, cond, mask_l, masked, drop, null_text)
        eps, labels = core.forward(
            pipe.unet,
            pipe.conditioner,
            ld,
            pipe.tap,
            core.unet_input(z_t, mask_l, masked, pipe.inpainting),
            t,
            cond,
            queries,
            drop,
            null_text,
        )
        out: dict[str, torch.Tensor] = {}
        if "denoise" in self.active:
            out["denoise"] = losses.masked_denoising_loss(
                eps, noise, losses.denoise_weights(mask, batch.get("features"), lc.feature_weight, z0.shape[-2:])
            )
        if "text_au" in self.active:
            out["text_au"] = losses.text_au_loss(
                labels, batch["intensity"].to(dev), rows=keep, target_occurrence=batch["occurrence"].to(dev)
            )
        if "image_label" in self.active:
            out["image_label"] = losses.image_label_loss(
                labels,
                batch["consensus_occurrence"].to(dev),
                batch["consensus_intensity"].to(dev),
                batch["consensus_agree"].to(dev),
                rows=keep,
            )
        if "identity" in self.active or "clip" in self.active:
            a = self.alphas[t].view(-1, 1, 1, 1).to(eps.dtype)
            x0_hat = (z_t - (1 - a).sqrt() * eps) / a.sqrt()
            img = pipe.decode_latents(x0_hat).clamp(-1, 1)
            img = mask * img + (1.0 - mask) * x0  # outside the face the data image stands
            w = a.view(-1).sqrt() * keep.float()
            if "identity" in self.active:
                out["identity"] = losses.identity_loss(core.embed_identity(pipe.identity_encoder, img), id_emb, w)
            if "clip" in self.active:
                out["clip"] = self._clip_loss(img, exemplar, batch["prompt"])
        return out

    def previous_au_queries(self, z0, noise, t, cond, mask_l, masked, drop, null_text) -> torch.Tensor:
        """C_AU(t-1): a no-grad pass at the preceding sampling step, EMA'd with the learned queries, detached."""
        pipe = self.pipe
        T = self.noise_scheduler.config.num_train_timesteps
        t_prev = (t + self.cfg.losses.mutual_gap).clamp(max=T - 1)
        with torch.no_grad():
            z_prev = self.noise_scheduler.add_noise(z0, noise, t_prev)
            _, prev = core.forward(
                pipe.unet,
                pipe.conditioner,
                pipe.label_decoder,
                pipe.tap,
                core.unet_input(z_prev, mask_l, masked, pipe.inpainting),
                t_prev,
                cond,
                None,
                drop,
                null_text,
            )
            ld = pipe.label_decoder
            return core.next_au_state(ld, ld.initial_queries(z0.shape[0]), prev.tokens)

    def _clip_loss(self, img: torch.Tensor, exemplar: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        model, tok = self.clip
        size = model.config.vision_config.image_size
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=img.device).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=img.device).view(1, 3, 1, 1)

        def prep(x):
            x = F.interpolate((x + 1) / 2, size=(size, size), mode="bilinear", align_corners=False)
            return (x - mean) / std

        enc = tok(list(prompts) + ["a neutral face"], padding=True, truncation=True, return_tensors="pt").to(img.device)
        tf = model.get_text_features(**enc)
        tf = getattr(tf, "pooler_output", tf)
        fi = model.get_image_features(pixel_values=prep(img))
        fe = model.get_image_features(pixel_values=prep(exemplar))
        fi, fe = getattr(fi, "pooler_output", fi), getattr(fe, "pooler_output", fe)
        return losses.directional_clip_loss(fi, fe, tf[:-1], tf[-1:].expand_as(tf[:-1]))

    def combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        lc = self.cfg.losses
        if lc.adaptive:
            if self.step % lc.adaptive_every == 0:
                norms = losses.gradient_norms(terms, self.mrl_conv.weight)
                self.weights = losses.adaptive_weights(norms)
        else:
            self.weights = {k: float(lc.weights.get(k, 1.0)) for k in terms}
        return sum(self.weights[k] * v for k, v in terms.items())

    def step_generator(self) -> torch.Generator:
        """Noise, timesteps, condition dropout and mutual conditioning of this step: seeded by (seed, step),
        and by the process when there are several, or each would draw the same ones for its own batch."""
        acc = self.accelerator
        key = [self.cfg.seed, self.step, 1] + ([acc.process_index] if acc.num_processes > 1 else [])
        return torch.Generator().manual_seed(int(np.random.default_rng(key).integers(2**62)))

    def train_step(self) -> dict[str, float]:
        self.modules.train()
        g = self.step_generator()
        batch = self.make_batch(self.batch_indices(self.step))
        with self.accelerator.autocast():
            terms = self.compute_losses(batch, generator=g)
            total = self.combine(terms)
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"loss is not finite at step {self.step} ({ {k: float(v) for k, v in terms.items()} }); "
                "lower lr, or use bf16 instead of fp16"
            )
        self.accelerator.backward(total)
        if self.accelerator.num_processes > 1:
            import torch.distributed as dist

            for p in self.params:
                if p.grad is None:  # unused here (e.g. no condition dropped) but maybe not on another process:
                    p.grad = torch.zeros_like(p)  # every process must reduce the same tensors
                dist.all_reduce(p.grad)
                p.grad /= self.accelerator.num_processes
        self.accelerator.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.lr_sched.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)
        self.step += 1
        rec = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
        rec |= {f"weight/{k}": float(w) for k, w in self.weights.items()}
        rec |= {"loss/total": float(total.detach()), "lr": self.lr_sched.get_last_lr()[0], "step": self.step}
        return rec

    # ------------------------------------------------------------------ loop, checkpoints

    def fit(self, steps: int | None = None) -> Path:
        """Train to `steps`, else `cfg.stop_at`, else `cfg.steps` (resuming from the newest complete
        checkpoint) and save `OUT/final`."""
        end = steps if steps is not None else self.cfg.stop_at or self.cfg.steps
        main = self.accelerator.is_main_process
        self.out.mkdir(parents=True, exist_ok=True)
        if main:
            (self.out / "train_config.yaml").write_text(self.config_yaml())
        self.resume()
        logf = (self.out / "train_log.jsonl").open("a") if (self.log_to_file and main) else None
        t0 = time.perf_counter()
        try:
            while self.step < end:
                rec = self.train_step()
                if self.step % self.cfg.log_every == 0 or self.step == end:
                    rec["elapsed_s"] = round(time.perf_counter() - t0, 2)
                    if logf:
                        logf.write(json.dumps(rec) + "\n")
                        logf.flush()
                    log.info(
                        "step %d/%d %s",
                        self.step,
                        end,
                        " ".join(
                            f"{k.split('/', 1)[-1] if k.startswith('loss') else k}={v:.4g}"
                            for k, v in rec.items()
                            if k.startswith(("loss/", "weight/"))
                        ),
                    )
                if self.step % self.cfg.checkpoint_every == 0 and self.step < end and main:
                    self.save_checkpoint()
        finally:
            if logf:
                logf.close()
        self.accelerator.wait_for_everyone()
        self.modules.eval()
        final = self.out / "final"
        if not main:
            return final
        self.save_checkpoint()
        tmp = self.out / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.save_pipeline(tmp, ema=True)
        (tmp / "train_config.yaml").write_text(self.config_yaml())  # the recipe travels with the weights
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        log.info("saved %s", final)
        return final

    def config_yaml(self) -> str:
        return yaml.safe_dump(json.loads(self.cfg.model_dump_json()), sort_keys=False)

    def _new_ema(self) -> EMAModel | None:
        """An EMA of the current trained weights (None when `ema_decay` is 0)."""
        if self.cfg.ema_decay <= 0:
            return None
        from diffusers.training_utils import EMAModel

        return EMAModel(self.params, decay=self.cfg.ema_decay, use_ema_warmup=True)

    def save_pipeline(self, path: Path, ema: bool) -> None:
        """Save the pipeline; with `ema` (and EMA on) its trained weights are the EMA's, then restored."""
        if not (ema and self.ema is not None):
            self.pipe.save_pretrained(path)
        else:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
            try:
                self.pipe.save_pretrained(path)
            finally:
                self.ema.restore(self.params)
        if self.on_save is not None:
            self.on_save(Path(path))

    def checkpoints(self) -> list[Path]:
        root = self.out / "checkpoints"
        if not root.is_dir():
            return []
        return sorted(p for p in root.glob("step-*") if (p / "COMPLETE").is_file())

    def save_checkpoint(self) -> Path:
        root = self.out / "checkpoints"
        final = root / f"step-{self.step:07d}"
        if (final / "COMPLETE").is_file():
            return final
        tmp = root / f".step-{self.step:07d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.save_pipeline(tmp / "pipeline", ema=False)
        if self.ema is not None:
            self.save_pipeline(tmp / "pipeline-ema", ema=True)
        torch.save(
            {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "lr_sched": self.lr_sched.state_dict(),
                "weights": self.weights,
                "consensus_cache": self._consensus_cache,
                "consensus_key": self._consensus_key(),
                "ema": None if self.ema is None else self.ema.state_dict(),
            },
            tmp / "trainer.pt",
        )
        (tmp / "COMPLETE").write_text(json.dumps({"step": self.step}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in self.checkpoints()[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s", final)
        return final

    def resume(self) -> bool:
        """Load the newest complete checkpoint under OUT, if any (half-written ones are ignored)."""
        cks = self.checkpoints()
        if not cks:
            return False
        ck = cks[-1]
        loaded = MAUGenPipeline.from_pretrained(ck / "pipeline")
        for name in ("unet", "conditioner", "label_decoder", "text_encoder"):
            getattr(self.pipe, name).load_state_dict(getattr(loaded, name).state_dict())
        try:
            state = torch.load(ck / "trainer.pt", map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unreadable file means the same thing here
            raise ValueError(
                f"checkpoint {ck}/trainer.pt is unreadable ({e}); delete {ck} to resume from the one before"
            ) from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_sched.load_state_dict(state["lr_sched"])
        self.weights = state["weights"]
        self._consensus_cache = state.get("consensus_cache", {})
        key = state.get("consensus_key")  # absent in checkpoints written before it was recorded
        if key is not None and key != self._consensus_key():
            log.warning(
                "checkpoint %s cached detector consensus for other training images or detectors "
                "(data / losses.detectors / losses.min_agree changed): recomputing it", ck
            )
            self._consensus_cache = {}
        if self.ema is not None:
            if state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            else:
                log.warning("checkpoint %s has no EMA state: the EMA starts from its weights at step %s", ck, state["step"])
                self.ema = self._new_ema()
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", ck, self.step)
        return True


def _ddpm(scheduler):
    """The training noise schedule: a DDPM scheduler with the pipeline scheduler's betas."""
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    return DDPMScheduler(**{k: scheduler.config[k] for k in keys if k in scheduler.config})
