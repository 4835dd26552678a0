"""The Conditional Label Decoder (CLD): the label branch of the Dual-branch Image Generator.

It reads up-path features z(l) of several UNet layers (captured by forward hooks, see
`core.FeatureTap`) and decodes 12 AU queries into occurrence logits and intensities 0-5.

Per tapped layer l:
1. a feature head: the time embedding added, a depthwise-separable convolution down to
   `query_dim` channels, a p x p patchify into tokens and a 2-D sinusoidal position code;
2. an AU transformer layer: self-attention over the patches, self-attention over the 12 AU
   tokens, the purified cross-attention from AU tokens to patches through the Identity
   Decoupling Module, a feed-forward, and with LGFE a Language-Guided Feature Enhancer.
The AU tokens pass from one layer's transformer to the next; two per-AU MLP heads read the last.

Identity Decoupling Module (IDM), with e = W_l * identity_embedding and e_hat = e / |e|:
- eq. 6, modulation mask: m_j = sigmoid(beta_l - gamma_l * cos(z_j, e_hat)), gamma_l = exp(.) > 0,
  so m lies in (0, 1) and falls as a patch token aligns with the identity;
- eq. 7, residual filtering: z~_j = z_j - (z_j . e_hat) e_hat, orthogonal to e_hat;
- eq. 8, purified attention: softmax(Q K~^T / sqrt(d_h) + log m) V~ with K~, V~ from z~, i.e.
  attention weights multiplied by m and renormalised.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from core.facs import INTENSITY_MAX, NUM_AUS


@dataclass
class LabelOutput:
    occurrence_logits: torch.Tensor  # (B, 12)
    intensity: torch.Tensor  # (B, 12) in [0, 5]
    tokens: torch.Tensor  # (B, 12, query_dim): the final-layer AU queries (mutual conditioning reads them)
    masks: list[torch.Tensor]  # per layer (B, N_l) modulation masks (empty when the IDM's mask is off)

    @property
    def occurrence(self) -> torch.Tensor:
        return torch.sigmoid(self.occurrence_logits)


@dataclass
class StepInvariants:
    """Per AU-transformer layer, what the label decoder computes from the prompt and the identity alone."""

    text: list[torch.Tensor | None]  # LGFE prompt states (None where the layer has no LGFE)
    identity: list[torch.Tensor | None]  # IDM identity direction e_hat (None where the layer has no IDM)


@functools.lru_cache(maxsize=64)
def sincos_2d(h: int, w: int, dim: int, device, dtype) -> torch.Tensor:
    """Fixed 2-D sine/cosine position code (h*w, dim): works at any feature-map size. Kept per size, device
    and dtype (a sampling step would otherwise rebuild it for every tapped layer); callers must not write it.
    Made outside inference mode and autograd, so a code first made while sampling serves training too."""
    with torch.inference_mode(False), torch.no_grad():
        return _sincos_2d(h, w, dim, device, dtype)


def _sincos_2d(h: int, w: int, dim: int, device, dtype) -> torch.Tensor:
    if dim % 4:
        raise ValueError(f"query_dim must be divisible by 4 for the 2-D position code, got {dim}")
    q = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(q, device=device, dtype=torch.float32) / q))
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    y = ys.reshape(-1, 1) * freq
    x = xs.reshape(-1, 1) * freq
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1).to(dtype)


class FeatureHead(nn.Module):
    """z(l) (B, C, H, W) + time embedding -> patch tokens (B, N, d)."""

    def __init__(self, channels: int, temb_dim: int, dim: int, patch: int):
        super().__init__()
        self.temb = nn.Linear(temb_dim, channels)
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.pointwise = nn.Conv2d(channels, dim, 1)
        self.norm = nn.GroupNorm(math.gcd(8, dim), dim)
        self.patchify = nn.Conv2d(dim, dim, patch, stride=patch)

    def forward(self, z: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        z = z + self.temb(F.silu(temb)).to(z.dtype)[:, :, None, None]
        z = F.silu(self.norm(self.pointwise(self.depthwise(z))))
        z = self.patchify(z)
        _, d, h, w = z.shape
        return z.flatten(2).transpose(1, 2) + sincos_2d(h, w, d, z.device, z.dtype)


class IdentityDecouplingModule(nn.Module):
    """Eq. 6 (modulation mask) and eq. 7 (residual filtering) for one layer's patch tokens."""

    def __init__(self, id_embed_dim: int, dim: int, use_mask: bool = True, use_filter: bool = True):
        super().__init__()
        self.use_mask = use_mask
        self.use_filter = use_filter
        self.id_proj = nn.Linear(id_embed_dim, dim)
        self.log_gamma = nn.Parameter(torch.tensor(math.log(4.0)))
        self.beta = nn.Parameter(torch.tensor(2.0))

    def identity_direction(self, id_embedding: torch.Tensor) -> torch.Tensor:
        """e_hat (B, d): the normalised identity vector in this layer's token space."""
        return F.normalize(self.id_proj(id_embedding).float(), dim=-1)

    def modulation_mask(self, tokens: torch.Tensor, e_hat: torch.Tensor) -> torch.Tensor:
        """Eq. 6: (B, N) in (0, 1), lower for tokens aligned with the identity."""
        cos = F.cosine_similarity(tokens.float(), e_hat[:, None, :], dim=-1)
        return torch.sigmoid(self.beta - self.log_gamma.exp() * cos)

    @staticmethod
    def residual_filter(tokens: torch.Tensor, e_hat: torch.Tensor) -> torch.Tensor:
        """Eq. 7: remove each token's component along e_hat (in float32, so it stays orthogonal)."""
        t = tokens.float()
        return (t - (t * e_hat[:, None, :]).sum(-1, keepdim=True) * e_hat[:, None, :]).to(tokens.dtype)

    def forward(
        self, tokens: torch.Tensor, id_embedding: torch.Tensor, e_hat: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`e_hat`: `identity_direction(id_embedding)`, when the caller computed it once for all steps."""
        e_hat = self.identity_direction(id_embedding) if e_hat is None else e_hat
        mask = self.modulation_mask(tokens, e_hat) if self.use_mask else None
        filtered = self.residual_filter(tokens, e_hat) if self.use_filter else tokens
        return filtered, mask


class PurifiedCrossAttention(nn.Module):
    """Eq. 8: multi-head cross-attention from AU queries to patch tokens, weights modulated by m."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"query_dim {dim} must be divisible by num_heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def weights(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention probabilities (B, heads, Q, N): exposed for tests and inspection."""
        b, nq, d = q.shape
        qh = self.q(q).view(b, nq, self.heads, -1).transpose(1, 2)
        kh = self.kv(kv)[..., :d].reshape(b, kv.shape[1], self.heads, -1).transpose(1, 2)
        logits = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])
        if mask is not None:
            logits = logits + mask.clamp_min(1e-6).log()[:, None, None, :].to(logits.dtype)
        return logits.softmax(-1)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, nq, d = q.shape
        qh = self.q(q).view(b, nq, self.heads, -1).transpose(1, 2)
        k, v = self.kv(kv).chunk(2, dim=-1)
        kh = k.reshape(b, kv.shape[1], self.heads, -1).transpose(1, 2)
        vh = v.reshape(b, kv.shape[1], self.heads, -1).transpose(1, 2)
        bias = None
        if mask is not None:
            bias = mask.clamp_min(1e-6).log()[:, None, None, :].to(qh.dtype)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias)
        return self.out(o.transpose(1, 2).reshape(b, nq, d))


def attend(
    mha: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`mha(query, key, value, key_padding_mask=..., need_weights=False)[0]` of a batch-first
    nn.MultiheadAttention, computed with F.scaled_dot_product_attention on the module's own weights.

    The module's inference fast path materialises every (query, key) score with bmm and softmax; with
    the CLD's small heads (64-768 wide, 8 heads) over 256 patch tokens that cost a third of a small
    UNet's step on a CPU, where SDPA's fused kernel costs a fraction of it (bench/bench_maugen_vs_diffusers.py).
    `key_padding_mask` is True where a key is padding, as for nn.MultiheadAttention."""
    d, h = mha.embed_dim, mha.num_heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    if query is key and key is value:
        q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
    else:
        q = F.linear(query, w[:d], None if b is None else b[:d])
        k = F.linear(key, w[d : 2 * d], None if b is None else b[d : 2 * d])
        v = F.linear(value, w[2 * d :], None if b is None else b[2 * d :])

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], h, d // h).transpose(1, 2)

    keep = None if key_padding_mask is None else ~key_padding_mask.bool()[:, None, None, :]
    o = F.scaled_dot_product_attention(
        heads(q), heads(k), heads(v), attn_mask=keep, dropout_p=mha.dropout if mha.training else 0.0
    )
    return mha.out_proj(o.transpose(1, 2).reshape(query.shape[0], query.shape[1], d))


class LanguageGuidedFeatureEnhancer(nn.Module):
    """LGFE: self-attention over the prompt tokens, then cross-attention from the AU queries into them."""

    def __init__(self, text_dim: int, dim: int, heads: int):
        super().__init__()
        self.text_in = nn.Linear(text_dim, dim)
        self.text_norm = nn.LayerNorm(dim)
        self.text_self = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.q_norm = nn.LayerNorm(dim)
        self.t_norm = nn.LayerNorm(dim)
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)

    def text_states(self, text: torch.Tensor, text_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The prompt's side (text projection, self-attention, norm): the same at every denoising step."""
        pad = None if text_mask is None else ~text_mask.bool()
        t = self.text_in(text.to(dtype))
        tn = self.text_norm(t)
        t = t + attend(self.text_self, tn, tn, tn, pad)
        return self.t_norm(t)

    def forward(
        self,
        q: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`states`: `text_states(text, text_mask, q.dtype)` computed once for all steps of a sampling call."""
        pad = None if text_mask is None else ~text_mask.bool()
        tn = self.text_states(text, text_mask, q.dtype) if states is None else states
        return q + attend(self.cross, self.q_norm(q), tn, tn, pad)


class AULayer(nn.Module):
    """One layer of the AU transformer (see the module docstring)."""

    def __init__(self, dim: int, heads: int, text_dim: int, id_embed_dim: int, cfg: dict):
        super().__init__()
        self.p_norm = nn.LayerNorm(dim)
        self.patch_self = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.q_norm1 = nn.LayerNorm(dim)
        self.au_self = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.q_norm2 = nn.LayerNorm(dim)
        self.kv_norm = nn.LayerNorm(dim)
        self.idm = (
            IdentityDecouplingModule(id_embed_dim, dim, cfg["use_modulation_mask"], cfg["use_residual_filter"])
            if cfg["use_idm"]
            else None
        )
        self.cross = PurifiedCrossAttention(dim, heads)
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.lgfe = LanguageGuidedFeatureEnhancer(text_dim, dim, heads) if cfg["use_lgfe"] else None

    def forward(
        self,
        q: torch.Tensor,
        patches: torch.Tensor,
        id_embedding: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        text_states: torch.Tensor | None = None,
        e_hat: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`text_states`, `e_hat`: this layer's StepInvariants, when the caller computed them once."""
        pn = self.p_norm(patches)
        patches = patches + attend(self.patch_self, pn, pn, pn)
        qn = self.q_norm1(q)
        q = q + attend(self.au_self, qn, qn, qn)
        kv = self.kv_norm(patches)
        mask = None
        if self.idm is not None:
            kv, mask = self.idm(kv, id_embedding, e_hat)
        q = q + self.cross(self.q_norm2(q), kv, mask)
        q = q + self.ffn(q)
        if self.lgfe is not None:
            q = self.lgfe(q, text, text_mask, text_states)
        return q, mask


class AUHeads(nn.Module):
    """Per-AU two-layer MLPs (weights stacked over the 12 AUs), occurrence logits and intensity."""

    def __init__(self, dim: int, hidden: int, num_aus: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(num_aus, dim, hidden) / math.sqrt(dim))
        self.b1 = nn.Parameter(torch.zeros(num_aus, hidden))
        self.w2 = nn.Parameter(torch.randn(num_aus, hidden, 2) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(num_aus, 2))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.gelu(torch.einsum("bad,adh->bah", self.norm(tokens), self.w1) + self.b1)
        o = torch.einsum("bah,ahk->bak", h, self.w2) + self.b2
        return o[..., 0], INTENSITY_MAX * torch.sigmoid(o[..., 1])


class ConditionalLabelDecoder(ModelMixin, ConfigMixin):
    """12 AU queries decoded from up-path UNet features into AU occurrence and intensity.

    `label_branch="pooled"` is the "no CLD" ablation: each layer's patch tokens are mean-pooled
    and added to the queries (no attention, no IDM, no LGFE), and the same heads read them.
    """

    @register_to_config
    def __init__(
        self,
        label_layers: tuple[int, ...] = (0, 1),
        feature_channels: tuple[int, ...] = (64, 32),
        patch_sizes: tuple[int, ...] = (2, 4),
        temb_dim: int = 128,
        text_dim: int = 64,
        id_embed_dim: int = 64,
        query_dim: int = 64,
        num_heads: int = 4,
        head_hidden: int = 64,
        num_aus: int = NUM_AUS,
        label_branch: str = "cld",
        use_idm: bool = True,
        use_modulation_mask: bool = True,
        use_residual_filter: bool = True,
        use_lgfe: bool = True,
        language_init: bool = True,
        mutual_conditioning: bool = True,
        ema_decay: float = 0.5,
    ):
        super().__init__()
        if not len(label_layers) == len(feature_channels) == len(patch_sizes):
            raise ValueError(
                f"label_layers {label_layers}, feature_channels {feature_channels} and patch_sizes {patch_sizes} "
                "must have one entry per tapped up block"
            )
        if label_branch not in ("cld", "pooled"):
            raise ValueError(f"label_branch must be 'cld' or 'pooled', got {label_branch!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.queries = nn.Parameter(torch.randn(num_aus, query_dim) * 0.02)
        self.heads_in = nn.ModuleList(
            FeatureHead(c, temb_dim, query_dim, p) for c, p in zip(feature_channels, patch_sizes, strict=True)
        )
        cfg = {
            "use_idm": use_idm and label_branch == "cld",
            "use_modulation_mask": use_modulation_mask,
            "use_residual_filter": use_residual_filter,
            "use_lgfe": use_lgfe,
        }
        self.layers = (
            nn.ModuleList(AULayer(query_dim, num_heads, text_dim, id_embed_dim, cfg) for _ in feature_channels)
            if label_branch == "cld"
            else None
        )
        self.heads = AUHeads(query_dim, head_hidden, num_aus)

    # ------------------------------------------------------------------ language init, EMA

    @torch.no_grad()
    def language_init_(self, description_embeddings: torch.Tensor) -> None:
        """Set the queries from text embeddings of the 12 AU descriptions (language initialisation)."""
        e = description_embeddings
        if e.shape != self.queries.shape:
            raise ValueError(
                f"language init needs ({self.config.num_aus}, query_dim={self.config.query_dim}) description embeddings, "
                f"got {tuple(e.shape)}; set query_dim to the text encoder's hidden size"
            )
        self.queries.copy_(F.layer_norm(e.float(), (e.shape[-1],)).to(self.queries.dtype) * 0.5)

    def ema(self, previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """Cross-timestep EMA of the final-layer AU queries: decay * previous + (1 - decay) * current."""
        a = self.config.ema_decay
        return a * previous + (1.0 - a) * current

    def initial_queries(self, batch: int) -> torch.Tensor:
        return self.queries.unsqueeze(0).expand(batch, -1, -1)

    def step_invariants(
        self,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor | None,
        id_embedding: torch.Tensor,
        dtype: torch.dtype,
    ) -> StepInvariants | None:
        """What each layer computes from the prompt and the identity alone (LGFE prompt states, IDM identity
        direction): a sampling call computes them once and passes them to every step's forward, which
        gives what computing them in each forward gives. None for the pooled branch (no layers)."""
        if self.layers is None:
            return None
        return StepInvariants(
            text=[None if m.lgfe is None else m.lgfe.text_states(text_tokens, text_mask, dtype) for m in self.layers],
            identity=[None if m.idm is None else m.idm.identity_direction(id_embedding) for m in self.layers],
        )

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        features: list[torch.Tensor],
        temb: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor | None,
        id_embedding: torch.Tensor,
        queries: torch.Tensor | None = None,
        invariants: StepInvariants | None = None,
    ) -> LabelOutput:
        """`invariants`: `self.step_invariants(...)` of these prompts and identities, computed once per call."""
        if len(features) != len(self.heads_in):
            raise ValueError(f"label decoder expects {len(self.heads_in)} feature maps, got {len(features)}")
        b = features[0].shape[0]
        q = self.initial_queries(b) if queries is None else queries
        q = q.to(features[0].dtype)
        masks: list[torch.Tensor] = []
        for i, (head, z) in enumerate(zip(self.heads_in, features, strict=True)):
            patches = head(z, temb)
            if self.layers is None:
                q = q + patches.mean(dim=1, keepdim=True)
                continue
            states, e_hat = (None, None) if invariants is None else (invariants.text[i], invariants.identity[i])
            q, mask = self.layers[i](q, patches, id_embedding, text_tokens, text_mask, states, e_hat)
            if mask is not None:
                masks.append(mask)
        logits, intensity = self.heads(q)
        return LabelOutput(occurrence_logits=logits, intensity=intensity, tokens=q, masks=masks)
