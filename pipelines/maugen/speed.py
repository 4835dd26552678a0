"""Throughput switches of a loaded pipeline: attention backend, channels_last, torch.compile, feature cache.

They work on any diffusers pipeline with a `unet` (MAUGen, and the stock inpainting pipeline the speed
benches compare it with), and none of them changes weights. `apply_speedups` is what the factory's
generator actor calls after loading a checkpoint (the `maugen` config section names the same switches):

- attention: "sdpa" (torch's scaled_dot_product_attention through diffusers' AttnProcessor2_0: flash /
  memory-efficient kernels on a GPU; what a MAUGen uses unless told otherwise) or "eager" (diffusers'
  AttnProcessor: matmul, softmax, matmul), MAUGen's routing of C_AU to the down path kept either way;
- channels_last: the UNet's weights and activations in NHWC, the layout tensor-core convolutions want;
- compile: torch.compile of the UNet in place (`Module.compile`: the pipeline keeps its UNet, its config
  and MAUGen's feature taps); the first calls at each batch shape pay the compilation;
- cache "pab": diffusers' Pyramid Attention Broadcast hook (diffusers.hooks) on the UNet's self-attention
  layers: inside noise levels t in (100, 800) each one recomputes its output every `cache_skip`-th UNet
  call and reuses the last one in between. Cross-attention is always computed: under mutual conditioning
  C_AU changes at every step, and the prompt's tokens are what draws the AUs.

Which of diffusers' cache hooks fit a UNet2DConditionModel (diffusers 0.42): Pyramid Attention
Broadcast does: it hooks any diffusers `Attention` module by name. FirstBlockCache, MagCache and
SeaCache need a top-level ModuleList of transformer blocks (a DiT); TaylorSeer matches module names of
DiT layouts and predicts whole block outputs from a fixed call count; FasterCache's denoiser hook
halves a batch it assumes is [unconditional, conditional] and returns an approximated unconditional
half, which MAUGen's [conditional, unconditional] batch and its feature taps (read from the UNet's
up path) cannot take. DeepCache is not in diffusers. So "pab" is the one cache.

A UNet call whose batch differs from the previous one (MAUGen's guidance interval switches between
one and two rows per sample) or whose timestep is not below the previous one (a new pipeline call)
starts the cache afresh, so a cached output is only ever reused at its own shape, within one call.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

log = logging.getLogger(__name__)

#: attention backend name -> the diffusers processor class MAUGen's processors delegate to
ATTENTION: dict[str, type] = {"sdpa": AttnProcessor2_0, "eager": AttnProcessor}
CACHES: tuple[str, ...] = ("none", "pab")
#: noise levels (timesteps of a 1000-step schedule) inside which PAB reuses attention outputs
PAB_TIMESTEPS: tuple[int, int] = (100, 800)


def attention_processor(backend: str) -> Any:
    """A fresh processor of `backend` (ATTENTION)."""
    try:
        return ATTENTION[backend]()
    except KeyError:
        raise ValueError(f"attention backend {backend!r} unknown; use one of {', '.join(ATTENTION)}") from None


def set_attention(pipe: Any, backend: str) -> None:
    """Every attention layer of `pipe.unet` on `backend`; a MAUGen keeps its C_AU routing."""
    if hasattr(pipe, "conditioner"):  # a MAUGenPipeline
        from .conditioning import install_mrl_processors

        install_mrl_processors(pipe.unet, pipe.conditioner, backend)
    else:
        pipe.unet.set_attn_processor(attention_processor(backend))


class _CacheReset:
    """Forward pre-hook of the UNet: records the timestep for PAB and restarts the cache when a call
    changes the batch or does not continue the previous call's descending timesteps."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.timestep = -1.0
        self.rows = -1

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        from diffusers.hooks import HookRegistry

        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        if sample.shape[0] != self.rows or t >= self.timestep:
            HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks(recurse=True)
        self.rows, self.timestep = sample.shape[0], t


def enable_attention_cache(unet: torch.nn.Module, skip: int = 2, timesteps: tuple[int, int] = PAB_TIMESTEPS) -> None:
    """Pyramid Attention Broadcast (diffusers.hooks) on `unet`'s self-attention layers (see the module doc)."""
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    if skip < 2:
        raise ValueError(f"cache_skip must be >= 2 (1 would recompute every call), got {skip}")
    if getattr(unet, "_mifa_cache", None) is not None:
        raise ValueError("this UNet already has the attention cache")
    reset = _CacheReset(unet)
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=skip,
        spatial_attention_timestep_skip_range=timesteps,
        current_timestep_callback=lambda: reset.timestep,
    )
    apply_pyramid_attention_broadcast(unet, config)
    unet.register_forward_pre_hook(reset, with_kwargs=True)
    unet._mifa_cache = reset
    n = sum(isinstance(m, Attention) and not m.is_cross_attention for m in unet.modules())
    log.info("attention cache: Pyramid Attention Broadcast on %d self-attention layers, every %d calls", n, skip)


def apply_speedups(
    pipe: Any,
    attention: str = "sdpa",
    channels_last: bool = False,
    compile: bool = False,
    cache: str = "none",
    cache_skip: int = 2,
    compile_backend: str = "inductor",
) -> None:
    """The throughput switches on a loaded pipeline (moved to its device and dtype first)."""
    if cache not in CACHES:
        raise ValueError(f"cache {cache!r} unknown; use one of {', '.join(CACHES)}")
    set_attention(pipe, attention)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    if cache == "pab":
        enable_attention_cache(pipe.unet, cache_skip)
    if compile:
        pipe.unet.compile(backend=compile_backend)
    log.info(
        "generator speed switches: attention=%s channels_last=%s compile=%s cache=%s",
        attention, channels_last, compile, cache if cache == "none" else f"{cache}/{cache_skip}",
    )
