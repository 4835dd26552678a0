"""Fixture writers for the real path at toy scale (tests/test_real_path.py).

- `write_tiny_sd_inpainting`: a Stable Diffusion 1.5 inpainting folder in diffusers format with
  random weights and toy widths: model_index.json, unet/ (9 input channels: latent, mask, masked
  image), vae/ (4 down blocks: 8x smaller latents, as SD's), text_encoder/ (CLIP text model),
  tokenizer/ (word-level over the prompt grammar's words, in place of CLIP's 49k BPE), scheduler/
  (SD 1.5's PNDM config). `MAUGenPipeline.from_stable_diffusion` and
  `factory train --set model.base=DIR` read it as they would read the real weights.
- `write_face_pool`: a folder identity pool of photos (JPEG and PNG) with `attributes.csv` covering
  every skin and age group of the default plan, and user masks for some photos. No face dataset can
  be downloaded here, so the photos are puppet renders saved as files: to the factory they are
  photos like any other; the generator of the build is the trained SD-format MAUGen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: (file name, skin group, age group) of the pool's photos: every skin group 0-5 and every age group.
POOL_PHOTOS: tuple[tuple[str, int, str], ...] = (
    ("ada.jpg", 0, "child"),
    ("ben.jpg", 1, "young_adult"),
    ("cem.png", 2, "adult"),
    ("dia.jpg", 3, "elderly"),
    ("eli.jpg", 4, "child"),
    ("fay.jpg", 5, "young_adult"),
    ("gus.jpg", 0, "adult"),
    ("hal.jpg", 3, "elderly"),
)
#: Photos that come with their own mask (masks/STEM.png); in hal.jpg at 128 px OpenCV's frontal-face
#: detector finds no face, so with identities.masks=auto it is passed over (and recorded).
MASKED_PHOTOS: tuple[str, ...] = ("cem.png", "eli.jpg", "fay.jpg")


def write_tiny_sd_inpainting(root: Path, image_size: int = 128, seed: int = 0) -> Path:
    """A random-weight SD-1.5-inpainting-format folder whose UNet and VAE work at `image_size` px."""
    import torch
    from diffusers import PNDMScheduler, UNet2DConditionModel

    from pipelines.maugen.build import (
        SD15_SCHEDULER,
        SD15_TEXT,
        SD15_UNET,
        build_word_tokenizer,
        prompt_corpus,
        write_sd_index,
    )

    if image_size % 64:
        raise ValueError(f"image_size {image_size} must be a multiple of 64 (the VAE halves it 3 times, the UNet 3)")
    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    UNet2DConditionModel(
        sample_size=image_size // 8,
        in_channels=9,
        out_channels=4,
        block_out_channels=(16, 16, 32, 32),  # SD 1.5: (320, 640, 1280, 1280)
        layers_per_block=1,  # SD 1.5: 2
        down_block_types=SD15_UNET["down_block_types"],
        up_block_types=SD15_UNET["up_block_types"],
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ).save_pretrained(root / "unet")
    write_tiny_vae(root / "vae", image_size)
    # SD's CLIP tokenizer is a 49k-entry BPE; a word-level tokenizer over the prompt grammar's words
    # stands in for it (saved and loaded by transformers' AutoTokenizer the same way)
    tok = build_word_tokenizer(prompt_corpus(300), max_length=SD15_TEXT["max_position_embeddings"])
    tok.save_pretrained(root / "tokenizer")
    write_tiny_text_encoder(root / "text_encoder", tok, SD15_TEXT["max_position_embeddings"])
    PNDMScheduler(**SD15_SCHEDULER).save_pretrained(root / "scheduler")
    write_sd_index(root, "PNDMScheduler")
    return root


def write_face_pool(root: Path, size: int = 128, seed: int = 0) -> Path:
    """A folder pool: POOL_PHOTOS as `size` px photos, attributes.csv, masks/ for MASKED_PHOTOS."""
    from pipelines.puppet import PuppetRenderer
    from pipelines.puppet.identity import sample_identity

    rng = np.random.default_rng(seed)
    renderer = PuppetRenderer(size=size)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rows = ["name,skin_group,age_group"]
    for name, skin, age in POOL_PHOTOS:
        person = sample_identity(rng, skin_group=skin, age_group=age)
        images, masks = renderer.exemplars([person])
        img = Image.fromarray(images[0])
        if name.endswith(".jpg"):
            img.save(root / name, quality=90)
        else:
            img.save(root / name)
        if name in MASKED_PHOTOS:
            Image.fromarray((masks[0] > 0.5).astype(np.uint8) * 255).save(root / "masks" / (Path(name).stem + ".png"))
        rows.append(f"{name},{skin},{age}")
    (root / "attributes.csv").write_text("\n".join(rows) + "\n")
    return root


def write_tiny_vae(path: Path, image_size: int) -> None:
    """SD's VAE layout (4 blocks: 8x down), toy widths, random weights."""
    from diffusers import AutoencoderKL

    AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=image_size,
        scaling_factor=0.18215,
    ).save_pretrained(path)


def write_tiny_text_encoder(path: Path, tok, max_positions: int) -> None:  # noqa: ANN001 - a transformers tokenizer
    """SD's CLIP text encoder config at toy widths, random weights, sized for `tok`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines.maugen.build import SD15_TEXT

    CLIPTextModel(
        CLIPTextConfig(
            **(
                SD15_TEXT
                | {
                    "vocab_size": len(tok),
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "projection_dim": 32,
                    "max_position_embeddings": max_positions,
                    "eos_token_id": tok.eos_token_id,
                    "bos_token_id": tok.bos_token_id,
                    "pad_token_id": tok.pad_token_id,
                }
            )
        )
    ).save_pretrained(path)
