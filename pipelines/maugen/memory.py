"""What a MAUGen generator actor holds in memory, read off a checkpoint without loading its weights.

`factory build --dry-run` prints it for the configured checkpoint at `maugen.dtype`. Parameter
counts come from the safetensors headers (no tensor is read), or, for `meta:sd15` and
`meta:sd15-inpainting`, from MAUGen built at Stable Diffusion 1.5's sizes on the meta device
(`build.sd15_on_meta`): a cluster can be sized before the weights exist. Activations at
`maugen.batch_size` are traced on the meta device (`activation_memory`): one sampling step and the
VAE decode run on tensors without storage while every tensor alive at once is counted, with the
attention scores materialised (the CPU's kernel) and with a fused attention kernel (a GPU's flash /
memory-efficient attention). Allocator caching and kernel workspaces come on top; bench/gpu.sh
measures the real peak where a device is lent.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

META_PREFIX = "meta:"
#: meta:NAME -> whether the UNet is the 9-channel inpainting one
META_CHECKPOINTS: dict[str, bool] = {"sd15": False, "sd15-inpainting": True}
BYTES_PER_PARAMETER: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}


def is_meta(ref: str) -> bool:
    return ref.startswith(META_PREFIX)


def parameter_counts(ref: str) -> dict[str, int]:
    """Parameters per component of a checkpoint (`builtin:NAME`, a saved pipeline, or `meta:sd15[-inpainting]`)."""
    if is_meta(ref):
        name = ref[len(META_PREFIX) :]
        if name not in META_CHECKPOINTS:
            raise FileNotFoundError(
                f"maugen.checkpoint {ref!r}: the meta checkpoints are {', '.join(META_PREFIX + n for n in META_CHECKPOINTS)}"
            )
        from .build import sd15_on_meta

        return sd15_on_meta(inpainting=META_CHECKPOINTS[name])
    from safetensors import safe_open

    from .builtin import resolve_checkpoint

    counts: dict[str, int] = {}
    for comp in sorted(p for p in Path(resolve_checkpoint(ref)).iterdir() if p.is_dir()):
        n = 0
        for f in sorted(comp.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
        if n:
            counts[comp.name] = n
    return counts


def generator_memory(ref: str, dtype: str, batch: int | None = None, guidance: bool = True) -> dict[str, Any]:
    """The weights one generator actor holds at `dtype` (every component is loaded in that dtype) and,
    given `batch`, its activations' peak and the sum of both (`activation_memory`)."""
    counts = parameter_counts(ref)
    total = sum(counts.values())
    weights = total * BYTES_PER_PARAMETER[dtype]
    return {
        "checkpoint": ref,
        "dtype": dtype,
        "parameters": counts,
        "total_parameters": total,
        "weights_bytes": weights,
        "weights_gib": round(weights / 2**30, 3),
    } | ({} if batch is None else _with_activations(ref, dtype, batch, guidance, weights))


def _with_activations(ref: str, dtype: str, batch: int, guidance: bool, weights: int) -> dict[str, Any]:
    act = activation_memory(ref, dtype, batch, guidance)
    total = {k: round((weights + act[k]["peak_bytes"]) / 2**30, 3) for k in ("materialised_attention", "fused_attention")}
    return {
        "activations": act,
        "total_gib": total,
        "note": "activations traced on the meta device at maugen.batch_size; allocator caching and kernel "
        "workspaces come on top (bench/gpu.sh measures the peak on a device)",
    }


# ---------------------------------------------------------------------------------------------
# Activations: one sampling step and the VAE decode run on the meta device, their live tensors counted


class _LivePeak(TorchDispatchMode):
    """Counts the bytes of tensors alive at once while it is active (views share their base's bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _track(self, t: Any) -> Any:
        if isinstance(t, torch.Tensor) and not t._is_view():
            n = t.untyped_storage().nbytes()
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, n)
        return t

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        out = func(*args, **(kwargs or {}))
        tree_map(self._track, out)
        return out


class _FusedAttention(TorchFunctionMode):
    """Attention as a fused kernel (flash / memory-efficient) computes it: the (L x L) scores never exist.
    On the meta device SDPA otherwise decomposes into bmm + softmax, which materialises them."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False)[0]
        return func(*args, **kwargs)


def _meta_modules(ref: str) -> dict[str, Any]:
    """The checkpoint's UNet, VAE, conditioner and label decoder built from their configs on the meta device,
    with the text width, prompt length and identity width they are fed (no weight is read)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from .conditioning import MAUGenConditioner
    from .label_decoder import ConditionalLabelDecoder

    if is_meta(ref):
        from transformers import CLIPTextConfig

        from .build import SD15_TEXT, SD15_UNET, SD15_VAE
        from .pipeline import label_parts

        with init_empty_weights():
            unet = UNet2DConditionModel(**(SD15_UNET | {"in_channels": 9 if META_CHECKPOINTS[ref[len(META_PREFIX) :]] else 4}))
            vae = AutoencoderKL(**SD15_VAE)
            text = CLIPTextConfig(**SD15_TEXT)
            cond, dec = label_parts(unet, text.hidden_size, 512, (1, 2, 3), 16)
        return {"unet": unet, "vae": vae, "conditioner": cond, "label_decoder": dec,
                "text_dim": text.hidden_size, "text_len": text.max_position_embeddings, "id_dim": 512}  # fmt: skip
    import json

    from .builtin import resolve_checkpoint

    root = Path(resolve_checkpoint(ref))

    def config(name: str) -> dict[str, Any]:
        return json.loads((root / name / "config.json").read_text())

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config("unet"))
        vae = AutoencoderKL.from_config(config("vae")) if (root / "vae" / "config.json").is_file() else None
        cond = MAUGenConditioner.from_config(config("conditioner"))
        dec = ConditionalLabelDecoder.from_config(config("label_decoder"))
    tok = json.loads((root / "tokenizer" / "tokenizer_config.json").read_text())
    return {"unet": unet, "vae": vae, "conditioner": cond, "label_decoder": dec,
            "text_dim": config("text_encoder")["hidden_size"], "text_len": int(tok["model_max_length"]),
            "id_dim": config("identity_encoder")["dim"]}  # fmt: skip


def activation_memory(ref: str, dtype: str, batch: int, guidance: bool = True) -> dict[str, Any]:
    """Peak bytes of activations in one generator actor at `batch` images per call: the largest of one
    sampling step (UNet on 2 x batch with classifier-free guidance, the conditioner, the label decoder
    on the taps) and the VAE decode, traced on the meta device. Twice: with attention scores
    materialised (what the CPU's and torch's math kernel hold) and with a fused kernel (flash /
    memory-efficient attention on a GPU). Allocator caching and kernel workspaces come on top."""
    from .core import FeatureTap

    m = _meta_modules(ref)
    dt = getattr(torch, dtype)
    unet, vae, cond, dec = (m[k] for k in ("unet", "vae", "conditioner", "label_decoder"))
    for mod in (unet, vae, cond, dec):
        if mod is not None:
            mod.to(dt)
    side, cin = int(unet.config.sample_size), int(unet.config.in_channels)
    rows = 2 * batch if guidance else batch
    tap = FeatureTap(unet, dec.config.label_layers)

    def step() -> None:
        text = torch.empty(batch, m["text_len"], m["text_dim"], device="meta", dtype=dt)
        ident = torch.empty(batch, m["id_dim"], device="meta", dtype=dt)
        queries = dec.initial_queries(batch).to(device="meta", dtype=dt)
        ehs = cond(text, ident, queries)
        if guidance:
            ehs = torch.cat([ehs, ehs])
        x = torch.empty(rows, cin, side, side, device="meta", dtype=dt)
        unet(x, torch.tensor(500, device="meta"), encoder_hidden_states=ehs)
        feats, temb = tap.pop()
        mask = torch.ones(batch, m["text_len"], device="meta", dtype=torch.bool)
        dec([f[:batch] for f in feats], temb[:batch], text, mask, ident, queries)

    def decode() -> None:
        if vae is not None:
            vae.decode(torch.empty(batch, vae.config.latent_channels, side, side, device="meta", dtype=dt))

    out: dict[str, Any] = {"batch": batch, "guidance": guidance}
    try:
        for kind, modes in (("materialised_attention", ()), ("fused_attention", (_FusedAttention,))):
            peaks = {}
            for name, fn in (("step", step), ("vae_decode", decode)):
                with torch.no_grad(), contextlib.ExitStack() as stack:
                    for mode in modes:
                        stack.enter_context(mode())
                    live = stack.enter_context(_LivePeak())
                    fn()
                peaks[name] = live.peak
            worst = max(peaks.values())
            out[kind] = {"peak_bytes": worst, "peak_gib": round(worst / 2**30, 3), "by_stage": peaks}
    finally:
        tap.remove()
    return out
