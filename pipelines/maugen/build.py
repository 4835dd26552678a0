"""How a MAUGen is put together: the architecture config, the tiny puppet configuration, SD 1.5.

`MAUGenConfig` is one pydantic model: the base (a tiny from-scratch model, or a local Stable
Diffusion directory), the sizes of the tiny parts, and every switch of the paper's Table 3 (CLD,
IDM, its modulation mask and residual filter, mutual conditioning, language init, LGFE), so an
ablation row is a config, not a code path.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DConditionModel,
)
from pydantic import BaseModel, ConfigDict, Field

from core.identity_net import IdentityNet, load_identity_encoder

from . import core
from .pipeline import AU_TEXTS, MAUGenPipeline

log = logging.getLogger(__name__)

SCHEDULERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "ddpm": DDPMScheduler}


class MAUGenConfig(BaseModel):
    """Architecture of a MAUGen (the training config's `model` section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str = Field(
        "tiny", description="'tiny' (built from scratch) or a local Stable Diffusion directory (diffusers format)"
    )
    identity_encoder: str = Field(
        "builtin:identity",
        description="spec of the identity encoder (its torch weights are used: an IdentityNet folder, or with the "
        "spec's torch_arch an ArcFace IResNet backbone.pth); whoever calls build_pipeline loads it "
        "(detectors.builtin.torch_identity_encoder)",
    )
    # tiny sizes (ignored for an SD base)
    image_size: int = Field(64, ge=16)
    latent: Literal["pixel", "vae"] = Field(
        "pixel", description="tiny: diffuse on pixels, or on a fresh tiny VAE's latents"
    )
    patch_size: int = Field(
        1,
        ge=1,
        description="pixel latent: fold p x p pixel patches into 3 p^2 channels (lossless; the UNet runs on "
        "image_size / p, so p=2 makes a CPU step about 4x cheaper)",
    )
    inpainting: bool = Field(True, description="UNet input [x_t, face mask, masked exemplar] as SD-inpainting")
    reference: bool = Field(
        False,
        description="inpainting UNet also reads the whole exemplar, face included (as InstructPix2Pix reads its "
        "input image), so identity details inside the face (glasses, eyes) reach it as pixels, not only through "
        "C_ID; with init_from, the loaded UNet's input is widened by zero-initialised channels",
    )
    block_out_channels: tuple[int, ...] = (32, 48, 64, 96)
    attention_levels: tuple[bool, ...] = (False, False, True, True)
    layers_per_block: int = Field(1, ge=1)
    cross_attention_dim: int = 64
    attention_head_dim: int = 8
    text_hidden: int = 64
    text_layers: int = 2
    max_length: int = Field(48, ge=8)
    # label branch and conditioning (Table 3 switches)
    label_layers: tuple[int, ...] = (0, 1, 2)
    tokens_per_side: int = Field(
        8, ge=1, description="the label decoder patchifies each tapped map to about this many tokens a side"
    )
    num_id_tokens: int = Field(2, ge=1)
    num_heads: int = 4
    head_hidden: int = 64
    label_branch: Literal["cld", "pooled"] = "cld"
    use_idm: bool = True
    use_modulation_mask: bool = True
    use_residual_filter: bool = True
    use_lgfe: bool = True
    language_init: bool = True
    mutual_conditioning: bool = True
    ema_decay: float = Field(0.5, ge=0.0, lt=1.0)
    au_tokens_in_up_path: bool = False
    # noise schedule
    scheduler: Literal["ddim", "dpm", "ddpm"] = "ddim"
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon"] = "epsilon"

    def label_decoder_kwargs(self) -> dict:
        return {
            "num_heads": self.num_heads,
            "head_hidden": self.head_hidden,
            "label_branch": self.label_branch,
            "use_idm": self.use_idm,
            "use_modulation_mask": self.use_modulation_mask,
            "use_residual_filter": self.use_residual_filter,
            "use_lgfe": self.use_lgfe,
            "language_init": self.language_init,
            "mutual_conditioning": self.mutual_conditioning,
            "ema_decay": self.ema_decay,
        }


# ---------------------------------------------------------------------------- tokenizer of the tiny model


def prompt_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Texts the tiny tokenizer's vocabulary is built from: grammar prompts and the AU descriptions."""
    from pipelines.prompts import grammar_expand
    from pipelines.prompts.targets import random_requests

    texts = [grammar_expand(r) for r in random_requests(n, seed=seed)]
    return texts + list(AU_TEXTS)


def build_word_tokenizer(texts: list[str], max_length: int = 48):
    """A word-level tokenizer (lower-case, punctuation split) saved/loaded like any transformers tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    words: set[str] = set()
    pre = pre_tokenizers.Whitespace()
    norm = normalizers.Lowercase()
    for t in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    vocab = {tok: i for i, tok in enumerate(special + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=max_length,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
    )


# ---------------------------------------------------------------------------- parts


def tiny_unet(cfg: MAUGenConfig, latent_channels: int, sample_size: int) -> UNet2DConditionModel:
    n = len(cfg.block_out_channels)
    if len(cfg.attention_levels) != n:
        raise ValueError(f"attention_levels {cfg.attention_levels} needs one entry per block ({n})")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=(3 if cfg.reference else 2) * latent_channels + 1 if cfg.inpainting else latent_channels,
        out_channels=latent_channels,
        block_out_channels=cfg.block_out_channels,
        down_block_types=down,
        up_block_types=up,
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=8,
    )


def tiny_vae(image_size: int) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=image_size,
    )


def set_scheduler(pipe: MAUGenPipeline, name: str, config: Mapping[str, Any] | None = None) -> None:
    """Swap `pipe`'s sampler for SCHEDULERS[name]. The trained noise schedule (betas, prediction type)
    carries over from `config`, by default the pipeline's current scheduler."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: use one of {', '.join(sorted(SCHEDULERS))}")
    pipe.scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config if config is None else config)


def make_scheduler(cfg: MAUGenConfig):
    cls = SCHEDULERS[cfg.scheduler]
    return cls(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
    )


def build_pipeline(cfg: MAUGenConfig, identity_weights: str | Path | torch.nn.Module, seed: int = 0) -> MAUGenPipeline:
    """A fresh MAUGen: the tiny from-scratch model, or SD weights + fresh MAUGen parts.

    `identity_weights` is `cfg.identity_encoder` resolved by the caller: the loaded, frozen encoder
    (`detectors.builtin.torch_identity_encoder(cfg.identity_encoder)`, an IdentityNet or, for a spec with
    `torch_arch`, ArcFace's IResNet), or an IdentityNet's weights folder
    (`detectors.builtin.torch_weights(cfg.identity_encoder, "identity")`).
    """
    if isinstance(identity_weights, torch.nn.Module):
        identity_encoder = identity_weights
    else:
        identity_encoder = load_identity_encoder(identity_weights)
    kwargs = cfg.label_decoder_kwargs()
    if cfg.base != "tiny":
        pipe = MAUGenPipeline.from_stable_diffusion(
            cfg.base,
            identity_encoder,
            label_layers=cfg.label_layers,
            tokens_per_side=cfg.tokens_per_side,
            num_id_tokens=cfg.num_id_tokens,
            au_tokens_in_up_path=cfg.au_tokens_in_up_path,
            **kwargs,
        )
        if cfg.reference:
            if not pipe.inpainting:
                raise ValueError(f"model.reference needs an inpainting base; {cfg.base} has a text-to-image UNet")
            core.add_reference_channels(pipe.unet, pipe.latent_channels)
        return pipe
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    random.seed(seed)
    tokenizer = build_word_tokenizer(prompt_corpus(), cfg.max_length)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_hidden,
            intermediate_size=2 * cfg.text_hidden,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=max(1, cfg.text_hidden // 16),
            max_position_embeddings=cfg.max_length,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    vae = tiny_vae(cfg.image_size) if cfg.latent == "vae" else None
    scale = 4 if vae is not None else cfg.patch_size
    if cfg.image_size % scale:
        raise ValueError(f"model.image_size {cfg.image_size} must be a multiple of {scale} (the latent's scale)")
    latent_channels = 4 if vae is not None else 3 * cfg.patch_size**2
    sample_size = cfg.image_size // scale
    unet = tiny_unet(cfg, latent_channels, sample_size)
    return MAUGenPipeline.assemble(
        unet,
        vae,
        text_encoder,
        tokenizer,
        identity_encoder,
        make_scheduler(cfg),
        cfg.label_layers,
        cfg.tokens_per_side,
        cfg.num_id_tokens,
        cfg.au_tokens_in_up_path,
        **kwargs,
    )


# ---------------------------------------------------------------------------- Stable Diffusion 1.5 sizes

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
}
SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}


#: runwayml/stable-diffusion-inpainting's scheduler/scheduler_config.json (a PNDMScheduler): SD 1.5's noise
#: schedule, which any diffusers sampler takes over (set_scheduler)
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
}


def write_sd_index(root: Path, scheduler: str = "PNDMScheduler") -> None:
    """model_index.json of a Stable Diffusion inpainting folder in diffusers format, as SD 1.5 inpainting's
    (unet/, vae/, text_encoder/ a CLIPTextModel, tokenizer/, scheduler/ of class `scheduler`)."""
    import json

    index = {
        "_class_name": "StableDiffusionInpaintPipeline",
        "_diffusers_version": "0.6.0",
        "scheduler": ["diffusers", scheduler],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (Path(root) / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sd15_on_meta(
    inpainting: bool = False, label_layers: tuple[int, ...] = (1, 2, 3), tokens_per_side: int = 16
) -> dict[str, int]:
    """Build MAUGen at SD 1.5's sizes on the meta device (no memory, no weights); parameter counts."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    from .pipeline import label_parts

    with init_empty_weights():
        unet = UNet2DConditionModel(**(SD15_UNET | {"in_channels": 9 if inpainting else 4}))
        vae = AutoencoderKL(**SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
        ident = IdentityNet()
        cond, dec = label_parts(unet, text.config.hidden_size, ident.config.dim, label_layers, tokens_per_side)
    assert next(unet.parameters()).device.type == "meta"
    return {
        "unet": count(unet),
        "vae": count(vae),
        "text_encoder": count(text),
        "identity_encoder": count(ident),
        "conditioner": count(cond),
        "label_decoder": count(dec),
    }
