"""What training and sampling share: feature taps, prompt/identity encoding, one MAUGen forward.

One forward = the MRL/UNet predicts the noise from [C_T, C_ID, C_AU]; forward hooks on the up
blocks capture z(l) (no forked UNet); the label decoder turns them into AU labels.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.resize import resize_crop

from .conditioning import MAUGenConditioner
from .label_decoder import ConditionalLabelDecoder, LabelOutput


class FeatureTap:
    """Forward hooks on `unet.up_blocks[i]` (i in `layers`) and on the time embedding."""

    def __init__(self, unet: nn.Module, layers: Sequence[int]):
        n = len(unet.up_blocks)
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"label_layers {list(layers)} name up blocks {bad} that do not exist (the UNet has {n})")
        self.layers = list(layers)
        self._feats: dict[int, torch.Tensor] = {}
        self._temb: torch.Tensor | None = None
        self.handles = [unet.up_blocks[i].register_forward_hook(self._hook(i)) for i in self.layers]
        self.handles.append(unet.time_embedding.register_forward_hook(self._temb_hook))

    def _hook(self, i: int):
        def hook(module, args, output):
            self._feats[i] = output[0] if isinstance(output, tuple) else output

        return hook

    def _temb_hook(self, module, args, output) -> None:
        self._temb = output

    def pop(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The features and time embedding of the last UNet forward (and forget them)."""
        if self._temb is None or any(i not in self._feats for i in self.layers):
            raise RuntimeError("no UNet forward was captured; call the UNet before reading its features")
        feats = [self._feats.pop(i) for i in self.layers]
        temb, self._temb = self._temb, None
        return feats, temb

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def tapped_channels(unet: nn.Module, layers: Sequence[int]) -> tuple[int, ...]:
    """Output channels of the tapped up blocks (the label decoder's feature_channels)."""
    rev = list(reversed(unet.config.block_out_channels))
    return tuple(rev[i] for i in layers)


@dataclass
class Condition:
    """The per-sample condition: prompt tokens (C_T and its padding mask) and the identity embedding."""

    text_tokens: torch.Tensor  # (B, L, D_text)
    text_mask: torch.Tensor  # (B, L) bool, True for real tokens
    id_embedding: torch.Tensor  # (B, D_id)

    def __len__(self) -> int:
        return self.text_tokens.shape[0]


def encode_prompt(
    tokenizer, text_encoder: nn.Module, prompts: Sequence[str], device
) -> tuple[torch.Tensor, torch.Tensor]:
    """C_T: the text encoder's last hidden states, padded to the tokenizer's max length (as SD does)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings; entries {bad[:5]} are not")
    limit = tokenizer.model_max_length
    enc = tokenizer(list(prompts), padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
    cut = sum(len(ids) > limit for ids in tokenizer(list(prompts), truncation=False, verbose=False).input_ids)
    if cut:  # the model is conditioned on less than the checks judge; one warning per process and caller
        warnings.warn(
            f"prompts longer than the text encoder's {limit} tokens are cut, so the model never reads their end; "
            "train with a larger model.max_length",
            stacklevel=2,
        )
    ids = enc.input_ids.to(device)
    tokens = text_encoder(ids)[0]
    return tokens, enc.attention_mask.to(device).bool()


def embed_identity(identity_encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised identity embeddings of images in [-1, 1], resized to the encoder's config `image_size`
    (the shorter side to its `resize` first and centre-cropped, where the config has one: an IResNet from a spec)."""
    cfg = identity_encoder.config
    size = int(cfg.image_size)
    p = next(identity_encoder.parameters())
    x = resize_crop(images, size, cfg.get("resize"))  # as the ONNX runtime resizes, differentiably
    return F.normalize(identity_encoder(x.to(p.dtype)).float(), dim=-1)


def description_embeddings(tokenizer, text_encoder: nn.Module, descriptions: Sequence[str]) -> torch.Tensor:
    """Mean of the text encoder's token states over each description (language initialisation)."""
    p = next(text_encoder.parameters())
    with torch.no_grad():
        tokens, mask = encode_prompt(tokenizer, text_encoder, descriptions, p.device)
        m = mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


def is_inpainting(unet: nn.Module, latent_channels: int) -> bool:
    c = unet.config.in_channels
    if c == latent_channels:
        return False
    if c in (2 * latent_channels + 1, 3 * latent_channels + 1):
        return True
    raise ValueError(
        f"UNet in_channels {c} fits neither {latent_channels} (text-to-image), {2 * latent_channels + 1} "
        f"(inpainting: latent, mask, masked image) nor {3 * latent_channels + 1} (inpainting with the whole exemplar)"
    )


def has_reference(unet: nn.Module, latent_channels: int) -> bool:
    """Whether the UNet also reads the whole exemplar, face included (`model.reference`)."""
    return unet.config.in_channels == 3 * latent_channels + 1


def add_reference_channels(unet: nn.Module, latent_channels: int) -> None:
    """Widen an inpainting UNet's conv_in by the exemplar's channels, zero-initialised (as InstructPix2Pix
    widens SD's), so the widened model computes exactly what the loaded one did until training moves them."""
    old = unet.conv_in
    if unet.config.in_channels != 2 * latent_channels + 1:
        raise ValueError(
            f"model.reference widens an inpainting UNet ({2 * latent_channels + 1} input channels); this one has "
            f"{unet.config.in_channels}"
        )
    new = nn.Conv2d(
        old.in_channels + latent_channels,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        dtype=old.weight.dtype,
        device=old.weight.device,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=new.in_channels)


def latent_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """The face mask at the diffusion resolution: the face's share of each latent cell (training and sampling alike)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=tuple(size), mode="area")


def unet_input(
    x_t: torch.Tensor, mask: torch.Tensor | None, masked: torch.Tensor | None, inpainting: bool
) -> torch.Tensor:
    """The UNet's input: x_t, or [x_t, mask, image condition] for an inpainting UNet (SD-inpainting layout;
    the image condition is the masked exemplar, and the whole exemplar after it with `model.reference`)."""
    if not inpainting:
        return x_t
    if mask is None or masked is None:
        raise ValueError("an inpainting MAUGen needs a face mask and the masked exemplar")
    return torch.cat([x_t, mask.to(x_t.dtype), masked.to(x_t.dtype)], dim=1)


def next_au_state(label_decoder: ConditionalLabelDecoder, previous: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mutual conditioning: the EMA of final-layer AU tokens, detached, is the next step's C_AU source."""
    return label_decoder.ema(previous, tokens).detach()


def forward(
    unet: nn.Module,
    conditioner: MAUGenConditioner,
    label_decoder: ConditionalLabelDecoder,
    tap: FeatureTap,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    cond: Condition,
    au_queries: torch.Tensor | None,
    drop: torch.Tensor | None = None,
    null_text_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LabelOutput]:
    """One MAUGen step: noise prediction and labels. `au_queries` None means the learned queries."""
    b = sample.shape[0]
    queries = label_decoder.initial_queries(b) if au_queries is None else au_queries
    ehs = conditioner(cond.text_tokens, cond.id_embedding, queries, drop, null_text_tokens)
    eps = unet(sample, timestep, encoder_hidden_states=ehs.to(sample.dtype)).sample
    feats, temb = tap.pop()
    labels = label_decoder(feats, temb, cond.text_tokens, cond.text_mask, cond.id_embedding, queries)
    return eps, labels
