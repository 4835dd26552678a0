"""The generator's throughput switches (pipelines/maugen/speed.py, the `maugen` config section): attention
backend, channels_last, torch.compile, the PAB attention cache, bfloat16 on the CPU; and the label
decoder's attention through SDPA. Each is checked to be applied and to compute what it should."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from test_maugen import ID_WEIGHTS, MICRO

from factory.config import ConfigError, load_config
from pipelines.maugen import MAUGenConfig, MAUGenPipeline, build_pipeline
from pipelines.maugen.conditioning import DropAUTokensProcessor
from pipelines.maugen.data import PuppetFaceDataset
from pipelines.maugen.label_decoder import attend
from pipelines.maugen.speed import apply_speedups, enable_attention_cache, set_attention


@pytest.fixture(scope="module")
def people() -> PuppetFaceDataset:
    return PuppetFaceDataset(2, 2, split="heldout", seed=3, workers=1)


def fresh(**kw) -> MAUGenPipeline:
    """A MICRO pipeline of its own: the switches change it for good (hooks, compile)."""
    p = build_pipeline(MAUGenConfig(**(MICRO | kw)), ID_WEIGHTS, seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def run(p: MAUGenPipeline, ds: PuppetFaceDataset, steps: int = 3, **kw):
    n = len(ds)
    ex = np.stack([ds[i].exemplar for i in range(n)])
    masks = np.stack([ds[i].mask for i in range(n)])
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    prompts = [ds[i].prompt for i in range(n)]
    return p(prompts, ex, num_inference_steps=steps, generator=gens, mask_image=masks, **kw)


def test_label_decoder_attention_through_sdpa_equals_multihead_attention():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x, ctx = torch.randn(3, 20, 32), torch.randn(3, 9, 32)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[0, 5:] = True
    pad[2, 1:] = True
    with torch.no_grad():
        torch.testing.assert_close(attend(mha, x, x, x), mha(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)
        got = attend(mha, x, ctx, ctx, pad)
        want = mha(x, ctx, ctx, key_padding_mask=pad, need_weights=False)[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and it trains: gradients reach the module's own weights
    attend(mha.train(), x, ctx, ctx, pad).square().mean().backward()
    assert mha.in_proj_weight.grad is not None and mha.out_proj.weight.grad.abs().sum() > 0


def test_eager_attention_keeps_the_au_routing_and_agrees_with_sdpa(people):
    p = fresh()
    sdpa = run(p, people)
    set_attention(p, "eager")
    procs = p.unet.attn_processors
    dropped = [v for k, v in procs.items() if k.startswith("up_blocks.") and k.endswith("attn2.processor")]
    assert dropped and all(isinstance(v, DropAUTokensProcessor) and isinstance(v.inner, AttnProcessor) for v in dropped)
    assert all(type(v) is AttnProcessor for v in procs.values() if not isinstance(v, DropAUTokensProcessor))
    eager = run(p, people)
    np.testing.assert_allclose(eager.images.astype(int), sdpa.images.astype(int), atol=2)
    np.testing.assert_allclose(eager.au_intensity, sdpa.au_intensity, atol=1e-3)
    with pytest.raises(ValueError, match="attention backend 'flash' unknown; use one of sdpa, eager"):
        set_attention(p, "flash")


def test_pab_reuses_self_attention_inside_its_noise_levels_and_restarts_each_call(people):
    p = fresh()
    base = run(p, people, steps=6, guidance_scale=3.0)
    enable_attention_cache(p.unet, skip=2)
    self_attn = [m for m in p.unet.modules() if isinstance(m, Attention) and not m.is_cross_attention]
    cross = [m for m in p.unet.modules() if isinstance(m, Attention) and m.is_cross_attention]
    calls = {"self": 0, "cross": 0}

    class Counting(AttnProcessor2_0):
        def __init__(self, kind: str):
            super().__init__()
            self.kind = kind

        def __call__(self, *a, **k):
            calls[self.kind] += 1
            return super().__call__(*a, **k)

    self_attn[0].set_processor(Counting("self"))
    cross[0].set_processor(Counting("cross"))
    ts: list[float] = []
    hook = p.unet.register_forward_pre_hook(lambda m, args: ts.append(float(args[1])))
    try:
        # the guidance interval switches from 1 to 2 rows per sample mid-call: the cache restarts there
        cached = run(p, people, steps=6, guidance_scale=3.0, guidance_interval=(0.0, 0.6))
        n_self, n_cross, calls["self"], calls["cross"] = calls["self"], calls["cross"], 0, 0
        again = run(p, people, steps=6, guidance_scale=3.0, guidance_interval=(0.0, 0.6))
    finally:
        hook.remove()
    assert n_cross == 6  # cross-attention (C_AU under mutual conditioning) is computed at every call
    inside = [100 < t < 800 for t in ts[:6]]
    assert sum(inside) >= 3 and n_self < 6  # some inside-range calls reused their last output
    assert calls["self"] == n_self  # a new call starts afresh: the same calls computed, the same samples
    np.testing.assert_array_equal(cached.images, again.images)
    assert np.isfinite(cached.au_intensity).all() and not np.array_equal(cached.images, base.images)
    with pytest.raises(ValueError, match="already has the attention cache"):
        enable_attention_cache(p.unet)


def test_bfloat16_and_channels_last_on_the_cpu(people):
    p = fresh()
    ref = run(p, people)
    apply_speedups(p, channels_last=True)
    assert p.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    nhwc = run(p, people)
    np.testing.assert_allclose(nhwc.images.astype(int), ref.images.astype(int), atol=2)
    np.testing.assert_allclose(nhwc.au_intensity, ref.au_intensity, atol=1e-3)
    ref = run(fresh(), people, steps=2)
    bf = fresh().to(torch.bfloat16)  # emulated on a CPU without AVX512-BF16: slow, so 2 steps
    out = run(bf, people, steps=2)
    assert bf.unet.dtype == torch.bfloat16 and out.finite.all()
    assert np.abs(out.au_intensity - ref.au_intensity).max() < 0.5  # bf16 keeps ~3 significant digits
    assert np.abs(out.images.astype(int) - ref.images.astype(int)).mean() < 8


@pytest.mark.slow  # dynamo traces the UNet: about a minute on 2 cores
def test_compile_in_place_keeps_the_feature_taps(people):
    p = fresh()
    ref = run(p, people)
    apply_speedups(p, compile=True, compile_backend="eager")  # dynamo's graph capture, without inductor's codegen
    assert p.unet._compiled_call_impl is not None and isinstance(p.unet.config.sample_size, int)
    fast = run(p, people)  # MAUGen's feature taps still feed the label decoder from the compiled UNet
    np.testing.assert_allclose(fast.images.astype(int), ref.images.astype(int), atol=2)
    np.testing.assert_allclose(fast.au_intensity, ref.au_intensity, atol=1e-3)


def test_the_generator_applies_the_config_switches_where_it_loads_the_pipeline():
    from factory.generators import MAUGenGenerator

    cfg = load_config(None, [
        "maugen.device=cpu", "maugen.dtype=bfloat16", "maugen.attention=eager", "maugen.channels_last=true",
        "maugen.cache=pab", "maugen.cache_skip=3",
    ])
    gen = MAUGenGenerator(cfg)
    unet = gen.pipe.unet
    assert unet.dtype == torch.bfloat16 and unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(next(iter(unet.attn_processors.values())), AttnProcessor)
    assert unet._mifa_cache is not None and gen.pipe.label_decoder.dtype == torch.bfloat16


def test_float16_on_the_cpu_is_one_clear_config_error(monkeypatch):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["maugen.device=cpu", "maugen.dtype=float16"])
    assert str(err.value) == (
        "config error: maugen.dtype: float16 needs a GPU but maugen.device is cpu; use bfloat16 or float32 on the "
        "CPU (got 'float16')"
    )
    with pytest.raises(ConfigError, match=r"maugen.cache: Input should be 'none' or 'pab'"):
        load_config(None, ["maugen.cache=deepcache"])
    # device=auto on a machine without a GPU: the generator refuses at load, naming the fix
    from factory.generators import MAUGenGenerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="maugen.dtype=float16 needs a GPU and this generator runs on the CPU; set "):
        MAUGenGenerator(load_config(None, ["maugen.dtype=float16"]))


def test_step_invariant_work_runs_once_per_call(people):
    """The label decoder's prompt and identity states (LGFE, IDM) and the encoded exemplar (reference
    channels, the region outside the face) are computed once per sampling call, and give what computing
    them at every use gives."""
    p = fresh(latent="vae", reference=True)
    ld = p.label_decoder
    text = torch.randn(2, 11, ld.config.text_dim)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 6:] = False
    feats = [torch.randn(2, c, 8, 8) for c in ld.config.feature_channels]
    temb, ident = torch.randn(2, ld.config.temb_dim), torch.randn(2, ld.config.id_embed_dim)
    with torch.no_grad():
        inv = ld.step_invariants(text, mask, ident, torch.float32)
        a = ld(feats, temb, text, mask, ident, None, inv)
        b = ld(feats, temb, text, mask, ident)
    assert len(inv.text) == len(inv.identity) == len(ld.layers)
    assert all(s is not None for s in inv.text + inv.identity)
    torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=0)
    torch.testing.assert_close(a.intensity, b.intensity, rtol=0, atol=0)

    ex = torch.rand(2, 3, 64, 64) * 2 - 1
    m = (torch.rand(2, 1, 64, 64) > 0.5).float()
    with torch.no_grad():
        cond, whole = p.encode_exemplar(ex, m)
        torch.testing.assert_close(whole, p.encode_images(ex), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cond, torch.cat([p.encode_images(ex * (1 - m)), whole], 1), rtol=1e-4, atol=1e-4)
    encodes: list[int] = []
    hook = p.vae.encoder.register_forward_hook(lambda mod, args, out: encodes.append(args[0].shape[0]))
    layer, once = p.label_decoder.layers[0], []
    counted = (layer.lgfe.text_in, layer.idm.id_proj)
    hooks = [hook] + [m.register_forward_pre_hook(lambda mod, args: once.append(1)) for m in counted]
    try:
        out = run(p, people, steps=3)
    finally:
        for h in hooks:
            h.remove()
    assert p.reference and encodes == [4]  # the masked exemplar and the whole one, in one VAE call
    assert len(once) == 2  # the prompt's LGFE states and the IDM's identity direction: once for the 3 steps
    assert np.isfinite(out.au_intensity).all()
