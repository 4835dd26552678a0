"""The joint condition [C_T, C_ID, C_AU] that the UNet's cross-attention reads.

- C_T: the text encoder's last hidden states of the prompt (given, not computed here).
- C_ID: the identity encoder's embedding through a projection to `num_id_tokens` tokens.
- C_AU: the 12 AU queries (from the label decoder, or from the previous denoising step under
  mutual conditioning) through a projection.

Classifier-free guidance needs an unconditional branch: dropped rows use the empty prompt's
text tokens (given by the caller) and learned null identity / AU tokens.

The MRL is the UNet's down path: it reads all three groups. The up path (the DIG's image
branch) reads [C_T, C_ID] only, as in the authors' code, where the AU tokens are appended for
the down path's cross-attentions; `install_mrl_processors` makes the up path drop them.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from core.facs import NUM_AUS


class MAUGenConditioner(ModelMixin, ConfigMixin):
    """Projects identity embeddings and AU queries into cross-attention tokens and joins them with C_T."""

    @register_to_config
    def __init__(
        self,
        cross_attention_dim: int = 64,
        id_embed_dim: int = 64,
        num_id_tokens: int = 2,
        query_dim: int = 64,
        num_aus: int = NUM_AUS,
        au_tokens_in_up_path: bool = False,
    ):
        super().__init__()
        self.id_proj = nn.Sequential(
            nn.Linear(id_embed_dim, cross_attention_dim * num_id_tokens),
            nn.Unflatten(-1, (num_id_tokens, cross_attention_dim)),
        )
        self.id_norm = nn.LayerNorm(cross_attention_dim)
        self.au_proj = nn.Linear(query_dim, cross_attention_dim)
        self.au_norm = nn.LayerNorm(cross_attention_dim)
        self.null_id = nn.Parameter(torch.zeros(num_id_tokens, cross_attention_dim))
        self.null_au = nn.Parameter(torch.zeros(num_aus, cross_attention_dim))

    def identity_tokens(self, id_embedding: torch.Tensor) -> torch.Tensor:
        """(B, id_embed_dim) -> C_ID (B, num_id_tokens, cross_attention_dim)."""
        return self.id_norm(self.id_proj(id_embedding))

    def au_tokens(self, au_queries: torch.Tensor) -> torch.Tensor:
        """(B, 12, query_dim) -> C_AU (B, 12, cross_attention_dim)."""
        return self.au_norm(self.au_proj(au_queries))

    def forward(
        self,
        text_tokens: torch.Tensor,
        id_embedding: torch.Tensor,
        au_queries: torch.Tensor,
        drop: torch.Tensor | None = None,
        null_text_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[C_T, C_ID, C_AU] (B, L + num_id_tokens + 12, D); rows where `drop` is True are unconditional."""
        c_id = self.identity_tokens(id_embedding)
        c_au = self.au_tokens(au_queries)
        if drop is not None and bool(drop.any()):
            if null_text_tokens is None:
                raise ValueError("condition dropout needs null_text_tokens (the empty prompt's text tokens)")
            d = drop.view(-1, 1, 1).to(c_id.dtype)
            text_tokens = text_tokens * (1 - d) + null_text_tokens.expand_as(text_tokens) * d
            c_id = c_id * (1 - d) + self.null_id.to(c_id.dtype) * d
            c_au = c_au * (1 - d) + self.null_au.to(c_au.dtype) * d
        return torch.cat([text_tokens.to(c_id.dtype), c_id, c_au], dim=1)

    def unconditional(self, null_text_tokens: torch.Tensor, batch: int) -> torch.Tensor:
        """The condition of the unconditional branch of classifier-free guidance."""
        t = null_text_tokens.expand(batch, -1, -1)
        dtype = self.null_id.dtype
        return torch.cat([t.to(dtype), self.null_id.expand(batch, -1, -1), self.null_au.expand(batch, -1, -1)], dim=1)


class DropAUTokensProcessor:
    """Cross-attention processor of the up path: attends to [C_T, C_ID], not to the trailing C_AU."""

    def __init__(self, num_aus: int = NUM_AUS, inner: Any = None):
        self.num_aus = num_aus
        self.inner = AttnProcessor2_0() if inner is None else inner

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        if encoder_hidden_states is not None and attn.is_cross_attention:
            encoder_hidden_states = encoder_hidden_states[:, : -self.num_aus]
            if attention_mask is not None:
                attention_mask = attention_mask[..., : -self.num_aus]
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def install_mrl_processors(unet: nn.Module, conditioner: MAUGenConditioner, attention: str = "sdpa") -> None:
    """Route C_AU to the down path (and mid block) only, unless the config puts it in the up path too.

    `attention` names the backend every layer computes with (pipelines/maugen/speed.py ATTENTION)."""
    from .speed import attention_processor

    procs = {}
    for name in unet.attn_processors:
        up = name.startswith("up_blocks.")
        if up and name.endswith("attn2.processor") and not conditioner.config.au_tokens_in_up_path:
            procs[name] = DropAUTokensProcessor(conditioner.config.num_aus, attention_processor(attention))
        else:
            procs[name] = attention_processor(attention)
    unet.set_attn_processor(procs)
