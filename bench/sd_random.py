"""Random-weight Stable Diffusion inpainting folders for the speed benches (nothing is downloaded).

`write_sd_inpainting(root, shape, image_size)` saves a diffusers-format folder in SD 1.5 inpainting's
layout (unet/ with 9 input channels, vae/, text_encoder/, tokenizer/, scheduler/ with SD 1.5's PNDM
config, model_index.json) that `MAUGenPipeline.from_stable_diffusion` (so `factory train --set
model.base=DIR`) and `StableDiffusionInpaintPipeline` both read as they would read the real weights.
Speed does not depend on the weights, so random ones time the real architecture. Shapes:

    sd15    SD 1.5's UNet, VAE and CLIP text encoder sizes (pipelines/maugen/build.py SD15_*)
    small   SD's block types and layout at small widths (UNet 32-64-128-128, 1 layer per block)
    toy     toy widths (as tests/real_fixtures.py), for dry runs that only check the code path

The tokenizer is a word-level one over the prompt grammar's words (CLIP's BPE vocabulary cannot be
fetched here); the sd15 text encoder keeps SD 1.5's 49,408-entry embedding and 77 positions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: What each shape changes in SD 1.5's configs: UNet, VAE, text encoder (hidden width, layers); None: SD 1.5's
SHAPES: dict[str, dict[str, Any] | None] = {
    "sd15": None,
    "small": {
        "unet": {"block_out_channels": (32, 64, 128, 128), "cross_attention_dim": 64, "norm_num_groups": 16},
        "vae": (32, 64, 64, 64),
        "text": (64, 2),
    },
    "toy": {
        "unet": {"block_out_channels": (16, 16, 32, 32), "cross_attention_dim": 32, "norm_num_groups": 8},
        "vae": (8, 16, 16, 16),
        "text": (32, 1),
    },
}


def _shape(shape: str) -> dict[str, Any] | None:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    return SHAPES[shape]


def unet_config(shape: str, image_size: int) -> dict[str, Any]:
    """UNet2DConditionModel kwargs of `shape` for `image_size` px (latents 8x smaller), 9 input channels."""
    from pipelines.maugen.build import SD15_UNET

    if image_size % 64:
        raise ValueError(f"image_size {image_size} must be a multiple of 64 (the VAE halves it 3 times, the UNet 3)")
    small = _shape(shape)
    base = SD15_UNET | {"in_channels": 9, "sample_size": image_size // 8}
    return base if small is None else base | small["unet"] | {"layers_per_block": 1, "attention_head_dim": 4}


def vae_config(shape: str, image_size: int) -> dict[str, Any]:
    from pipelines.maugen.build import SD15_VAE

    small = _shape(shape)
    base = SD15_VAE | {"sample_size": image_size, "scaling_factor": 0.18215}
    if small is None:
        return base
    return base | {"block_out_channels": small["vae"], "layers_per_block": 1, "norm_num_groups": 8}


def text_config(shape: str, tokenizer: Any) -> dict[str, Any]:
    from pipelines.maugen.build import SD15_TEXT

    small = _shape(shape)
    ids = {k: getattr(tokenizer, k) for k in ("eos_token_id", "bos_token_id", "pad_token_id")}
    if small is None:
        return SD15_TEXT | ids
    hidden, layers = small["text"]
    return SD15_TEXT | ids | {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "projection_dim": hidden,
    }


def write_sd_inpainting(root: Path, shape: str, image_size: int, seed: int = 0, device: str = "cpu") -> Path:
    """A random-weight SD-inpainting folder of `shape` whose UNet and VAE work at `image_size` px.

    `device`: where the weights are initialised (a GPU is far faster for sd15); they are saved as fp32.
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines.maugen.build import SD15_SCHEDULER, build_word_tokenizer, prompt_corpus, write_sd_index

    _shape(shape)
    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    tok = build_word_tokenizer(prompt_corpus(300), max_length=77)
    with torch.device(device):
        UNet2DConditionModel(**unet_config(shape, image_size)).save_pretrained(root / "unet")
        AutoencoderKL(**vae_config(shape, image_size)).save_pretrained(root / "vae")
        CLIPTextModel(CLIPTextConfig(**text_config(shape, tok))).save_pretrained(root / "text_encoder")
    tok.save_pretrained(root / "tokenizer")
    PNDMScheduler(**SD15_SCHEDULER).save_pretrained(root / "scheduler")
    write_sd_index(root)
    return root
