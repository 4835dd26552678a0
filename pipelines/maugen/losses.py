"""MAUGen's training losses and the adaptive weighting that combines them.

- eq. 10, masked denoising: || M * (eps - eps_hat) ||^2 averaged over the face mask M (given by the
  data at the diffusion resolution), so pixels outside the face give no gradient.
- eq. 9, text-AU: the label branch against the AU vector the prompt describes (BCE on occurrence,
  L1 on intensity / 5); occurrence comes from the intensity where it is coded, else from the
  dataset's occurrence code; AUs coded in neither (NaN) are left out.
- image-label: the label branch against detector consensus on the training image; only AUs the
  detectors agreed on contribute.
- identity (ArcFace-style): 1 - cos(E_id(x0_hat), E_id(exemplar)), rows weighted by sqrt(alpha_bar_t)
  since the predicted clean image means little at high noise.
- directional CLIP: 1 - cos(E_I(x0_hat) - E_I(exemplar), E_T(prompt) - E_T(neutral prompt)).
- eq. 11, adaptive weights: w_i = (1 / g_i) / sum_j (1 / g_j), g_i = ||dL_i / dW|| at the MRL's last
  conv layer W, so every term pushes that layer equally hard; weights are detached.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from core.facs import DEFAULT_OCCURRENCE_THRESHOLD, INTENSITY_MAX

from . import core
from .label_decoder import LabelOutput

log = logging.getLogger(__name__)


def masked_denoising_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 10: squared error inside the mask (B, 1, h, w), averaged over masked elements; a soft mask weights
    each element (its weighted mean)."""
    if mask.shape[0] != pred.shape[0] or mask.shape[-2:] != pred.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match the prediction {tuple(pred.shape)}")
    w = mask.to(torch.float32).expand_as(pred)
    return ((pred.float() - target.float()) ** 2 * w).sum() / w.sum().clamp_min(1.0)


def denoise_weights(
    mask: torch.Tensor, features: torch.Tensor | None, feature_weight: float, size: tuple[int, int]
) -> torch.Tensor:
    """The denoising loss's weights at the diffusion resolution `size`: the face mask (B, 1, H, W), times
    1 + feature_weight * the facial-feature map (FaceSample.features) when the weight is set: small
    features such as the eyes are what a sampler garbles first, and a plain mean gives them little weight."""
    if feature_weight > 0:
        if features is None:
            raise ValueError("losses.feature_weight needs every training sample's feature map (puppet data); set it to 0")
        mask = mask * (1.0 + feature_weight * features.to(mask.device))
    return core.latent_mask(mask, size)


def _zero(labels: LabelOutput) -> torch.Tensor:
    return labels.occurrence_logits.sum() * 0.0


def label_loss(
    labels: LabelOutput,
    occurrence: torch.Tensor,
    intensity: torch.Tensor | None,
    mask: torch.Tensor,
) -> torch.Tensor:
    """BCE on occurrence + L1 / 5 on intensity over the (row, AU) cells where `mask` is True."""
    m = mask.bool() & torch.isfinite(occurrence)
    if not bool(m.any()):
        return _zero(labels)
    loss = F.binary_cross_entropy_with_logits(labels.occurrence_logits.float()[m], occurrence.float()[m])
    if intensity is not None:
        mi = m & torch.isfinite(intensity)
        if bool(mi.any()):
            loss = loss + (labels.intensity.float()[mi] - intensity.float()[mi]).abs().mean() / INTENSITY_MAX
    return loss


def text_au_loss(
    labels: LabelOutput,
    target_intensity: torch.Tensor,
    rows: torch.Tensor | None = None,
    threshold: int = DEFAULT_OCCURRENCE_THRESHOLD,
    target_occurrence: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 9: labels against the AU vector the prompt describes. Occurrence is intensity >= threshold
    where the intensity is coded, else the dataset's own occurrence code (BP4D codes occurrence for
    more AUs than intensity, and its prompts describe those); intensity is judged where coded."""
    occ = torch.where(torch.isfinite(target_intensity), (target_intensity >= threshold).float(), target_intensity)
    if target_occurrence is not None:
        occ = torch.where(torch.isfinite(occ), occ, target_occurrence.float())
    mask = torch.ones_like(occ, dtype=torch.bool) if rows is None else rows.bool()[:, None].expand_as(occ)
    return label_loss(labels, occ, target_intensity, mask)


def image_label_loss(
    labels: LabelOutput,
    consensus_occurrence: torch.Tensor,
    consensus_intensity: torch.Tensor,
    agree: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Labels against detector consensus on the image; only agreed AUs contribute."""
    mask = agree.bool()
    if rows is not None:
        mask = mask & rows.bool()[:, None]
    return label_loss(labels, consensus_occurrence, consensus_intensity, mask)


def identity_loss(embedding: torch.Tensor, exemplar_embedding: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ArcFace-style identity term: weighted mean of 1 - cos(embedding, exemplar embedding)."""
    cos = F.cosine_similarity(embedding.float(), exemplar_embedding.float(), dim=-1)
    w = weight.float()
    return ((1.0 - cos) * w).sum() / w.sum().clamp_min(1e-8)


def directional_clip_loss(
    image_features: torch.Tensor,
    exemplar_features: torch.Tensor,
    text_features: torch.Tensor,
    neutral_text_features: torch.Tensor,
) -> torch.Tensor:
    """The change image -> exemplar must point where the text change (prompt vs neutral) points."""
    di = F.normalize(image_features.float() - exemplar_features.float(), dim=-1)
    dt = F.normalize(text_features.float() - neutral_text_features.float(), dim=-1)
    return (1.0 - (di * dt).sum(-1)).mean()


def mrl_last_conv(unet: nn.Module) -> nn.Conv2d:
    """The last convolution of the UNet's down path (the MRL), where eq. 11 measures gradients."""
    convs = [m for m in unet.down_blocks[-1].modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("the UNet's last down block has no convolution")
    return convs[-1]


def gradient_norms(losses: Mapping[str, torch.Tensor], weight: torch.Tensor) -> dict[str, float]:
    """||dL_i / dW|| for each loss (0.0 for a loss that does not reach W)."""
    out = {}
    for name, loss in losses.items():
        (g,) = torch.autograd.grad(loss, weight, retain_graph=True, allow_unused=True)
        out[name] = 0.0 if g is None else float(g.detach().float().norm())
    return out


def adaptive_weights(norms: Mapping[str, float], eps: float = 1e-12) -> dict[str, float]:
    """Eq. 11: w_i proportional to 1 / g_i, summing to 1.

    A term whose gradient does not reach the layer (g_i = 0) is given the mean norm of the
    others, so it keeps an average share rather than an infinite one.
    """
    if not norms:
        raise ValueError("adaptive weighting needs at least one loss")
    pos = [g for g in norms.values() if g > eps]
    fill = sum(pos) / len(pos) if pos else 1.0
    inv = {k: 1.0 / (g if g > eps else fill) for k, g in norms.items()}
    s = sum(inv.values())
    return {k: v / s for k, v in inv.items()}
