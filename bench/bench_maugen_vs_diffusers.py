"""MAUGen vs stock diffusers inpainting: images/s of the two pipelines on the same weights, as a ratio.

For each configuration it writes a random-weight Stable Diffusion inpainting folder (bench/sd_random.py),
builds MAUGen from it as `factory train --set model.base=DIR` does (MAUGenConfig's label decoder and
conditioner sizes, `--set KEY=VALUE` to change them; `MAUGenPipeline.from_stable_diffusion` adds the fresh
parts; the builtin identity encoder), and a stock `StableDiffusionInpaintPipeline` from the SAME UNet, VAE,
text encoder and tokenizer objects and a scheduler of the same class and config (DPM-Solver++, what a
build samples with). Both get the same prompts, exemplar images and face masks, steps, guidance (at
every step: the build's guidance interval would save MAUGen UNet work the stock pipeline cannot skip),
image size and batch, and each sample its own seeded generator (as the factory's generator does). The
stock pipeline runs on the UNet with diffusers' default SDPA processors and without MAUGen's feature taps
(swapped out while it runs, then back), so it pays nothing of MAUGen's.

The two are timed alternately after a 1-step warm-up (`--repeats` rounds, `--sd15-repeats` for sd15; best
of each), so load from elsewhere on the machine hits both alike; the ratio MAUGen / stock is the figure
(the issue's bar: >= 0.85), in wall-clock images/s and in images per CPU second of this process (what
other load moves least). The last round also splits each call's time by component (forward hooks), and
for sd15 it times, at `--profile-size` px, one UNet forward with guidance (2 rows) against one MAUGen
step's label decoder + conditioner + mutual-conditioning EMA.

Both configurations sample with the build's steps (`maugen.steps`, 15) by default, so a call's fixed costs
(MAUGen encodes the masked and the whole exemplar, the stock pipeline the masked one) weigh against the
UNet steps as they do in a build; sd15 runs at 128 px on a CPU, where the label decoder's share is larger
than at 512 px (its patch tokens do not grow with the image).

Run (2 CPU cores: about 5 minutes on a quiet machine; a GPU: add --device cuda):
    python bench/bench_maugen_vs_diffusers.py
    python bench/bench_maugen_vs_diffusers.py --configs small --small-size 128 --small-steps 15 --small-batch 4
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sd_random import write_sd_inpainting  # noqa: E402

from detectors.builtin import torch_identity_encoder  # noqa: E402
from factory.config import MAUGenGeneratorConfig  # noqa: E402
from pipelines.maugen import MAUGenPipeline  # noqa: E402
from pipelines.maugen.pipeline import tapped_sides  # noqa: E402
from pipelines.maugen.build import MAUGenConfig, build_pipeline, set_scheduler  # noqa: E402

#: the steps a build samples with (maugen.steps): a sampling call's fixed costs (encoding the exemplar,
#: decoding the image) weigh against the UNet steps as they do in a build
BUILD_STEPS = MAUGenGeneratorConfig().steps

PROMPT = "A face showing a clear smile with the lips apart and the brows raised."


@dataclass
class Case:
    name: str  # a shape of bench/sd_random.py
    size: int
    steps: int
    batch: int
    repeats: int  # alternating rounds of the two pipelines


def exemplars(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Puppet exemplars and face masks at `size` px: uint8 (n, size, size, 3), float32 (n, size, size)."""
    from PIL import Image

    from pipelines.puppet import PuppetRenderer
    from pipelines.puppet.data import identities

    render = min(size, 256)
    ex, masks = PuppetRenderer(size=render).exemplars(identities(n, "heldout"))
    if render != size:
        ex = np.stack([np.asarray(Image.fromarray(e).resize((size, size), Image.BICUBIC)) for e in ex])
        masks = np.stack([np.asarray(Image.fromarray(m).resize((size, size), Image.BILINEAR)) for m in masks])
    return ex, masks.astype(np.float32)


def maugen_from_sd(root: Path, model: dict[str, Any] | None = None) -> MAUGenPipeline:
    """MAUGen on the SD folder as `factory train --set model.base=ROOT` builds it (MAUGenConfig's label
    decoder and conditioner sizes, `model` overriding them; MAUGenPipeline.from_stable_diffusion)."""
    cfg = MAUGenConfig(**({"base": str(root)} | (model or {})))
    maugen = build_pipeline(cfg, torch_identity_encoder(cfg.identity_encoder))
    set_scheduler(maugen, "dpm")
    return maugen


def build(
    root: Path, device: str, dtype: torch.dtype, model: dict[str, Any] | None = None, own_unet: bool = False
) -> tuple[MAUGenPipeline, Any]:
    """MAUGen from the folder, and the stock inpainting pipeline on the same module objects; with
    `own_unet`, stock gets its own copy of the UNet, loaded from the same folder (so switches such as
    torch.compile apply to each pipeline's UNet alone)."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    maugen = maugen_from_sd(root, model)
    if (device, dtype) != ("cpu", torch.float32):
        maugen = maugen.to(device, dtype)
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet").to(device, dtype) if own_unet else maugen.unet
    stock = StableDiffusionInpaintPipeline(
        vae=maugen.vae,
        text_encoder=maugen.text_encoder,
        tokenizer=maugen.tokenizer,
        unet=unet,
        scheduler=type(maugen.scheduler).from_config(maugen.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for p in (maugen, stock):
        p.set_progress_bar_config(disable=True)
    return maugen, stock


@contextlib.contextmanager
def stock_unet(maugen: MAUGenPipeline) -> Iterator[None]:
    """The shared UNet as diffusers builds it (default SDPA processors, no feature taps) while inside."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from pipelines.maugen import core

    procs = maugen.unet.attn_processors
    maugen.tap.remove()
    maugen.unet.set_attn_processor(AttnProcessor2_0())
    try:
        yield
    finally:
        maugen.unet.set_attn_processor(procs)
        maugen.tap = core.FeatureTap(maugen.unet, maugen.label_decoder.config.label_layers)


def callers(
    maugen: MAUGenPipeline,
    stock: Any,
    batch: int,
    size: int,
    steps: int,
    guidance: float,
    device: str,
    build_interval: tuple[float, float] | None = None,
) -> dict[str, Callable[[], None]]:
    """A call of each pipeline on the same prompts, exemplars, masks and per-sample seeds, guidance at every
    step; with `build_interval`, "maugen-build" samples with that guidance interval, as a build does.
    Where stock shares MAUGen's UNet, its calls run on the UNet as diffusers builds it (`stock_unet`)."""
    from PIL import Image

    ex, masks = exemplars(batch, size)
    prompts = [PROMPT] * batch
    ex_pil = [Image.fromarray(e) for e in ex]
    mask_pil = [Image.fromarray((m * 255).astype(np.uint8)) for m in masks]
    shared = stock.unet is maugen.unet

    def gens() -> list[torch.Generator]:
        return [torch.Generator(device).manual_seed(i) for i in range(batch)]

    def run_maugen(interval: tuple[float, float] = (0.0, 1.0)) -> None:
        maugen(
            prompts, ex, mask_image=masks, num_inference_steps=steps, guidance_scale=guidance,
            guidance_interval=interval, generator=gens(), height=size, width=size, on_nonfinite="mark",
        )

    def run_stock() -> None:
        with stock_unet(maugen) if shared else contextlib.nullcontext():
            stock(
                prompts, image=ex_pil, mask_image=mask_pil, num_inference_steps=steps, guidance_scale=guidance,
                generator=gens(), height=size, width=size, output_type="np",
            )

    fns = {"maugen": run_maugen, "stock": run_stock}
    if build_interval is not None:
        fns["maugen-build"] = lambda: run_maugen(build_interval)
    return fns


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: str, cpu: list[float] | None = None) -> float:
    """Wall seconds of `fn()`; with `cpu`, the process's CPU seconds of it are appended there."""
    sync(device)
    c, t = time.process_time(), time.perf_counter()
    fn()
    sync(device)
    if cpu is not None:
        cpu.append(time.process_time() - c)
    return time.perf_counter() - t


class Profile:
    """Wall time inside named modules during a call (forward pre/post hooks; the CPU runs them in order)."""

    def __init__(self, modules: dict[str, torch.nn.Module], device: str):
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.device = device
        self.handles = []
        for name, m in modules.items():
            self.handles.append(m.register_forward_pre_hook(self._start(name)))
            self.handles.append(m.register_forward_hook(self._stop(name)))
        self._t0: dict[str, float] = {}

    def _start(self, name: str):
        def hook(module, args):
            sync(self.device)
            self._t0[name] = time.perf_counter()

        return hook

    def _stop(self, name: str):
        def hook(module, args, output):
            sync(self.device)
            self.total[name] += time.perf_counter() - self._t0.pop(name)
            self.calls[name] += 1

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def components(maugen: MAUGenPipeline, which: str) -> dict[str, torch.nn.Module]:
    parts = {"unet": maugen.unet, "vae.encoder": maugen.vae.encoder, "vae.decoder": maugen.vae.decoder,
             "text_encoder": maugen.text_encoder}
    if which == "maugen":
        parts |= {"identity_encoder": maugen.identity_encoder, "conditioner": maugen.conditioner,
                  "label_decoder": maugen.label_decoder}
    return parts


@torch.no_grad()
def step_parts(maugen: MAUGenPipeline, size: int, device: str, repeats: int = 2) -> dict[str, float]:
    """Seconds of one UNet forward with guidance (2 rows, batch 1) and of one step's label decoder,
    conditioner and mutual-conditioning EMA at `size` px, on the pipeline's modules, best of `repeats`
    (the label decoder's prompt and identity states are computed once per call, as sampling does)."""
    from pipelines.maugen import core

    dtype = maugen.unet.dtype
    sf = maugen.vae_scale_factor
    side = size // sf
    text, mask = core.encode_prompt(maugen.tokenizer, maugen.text_encoder, [PROMPT], device)
    text = text.to(dtype)
    ident = torch.zeros(1, 3, size, size, device=device)
    id_emb = core.embed_identity(maugen.identity_encoder, ident).to(dtype)
    ld = maugen.label_decoder
    queries = ld.initial_queries(1).to(dtype)
    x = torch.randn(2, maugen.unet.config.in_channels, side, side, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)
    ehs = maugen.conditioner(text, id_emb, queries)
    uncond = maugen.conditioner.unconditional(text, 1)

    def unet() -> None:
        maugen.unet(x, t, encoder_hidden_states=torch.cat([ehs, uncond])).sample
        maugen.tap.pop()

    unet()
    maugen.unet(x[:1], t, encoder_hidden_states=ehs)
    feats, temb = maugen.tap.pop()

    invariants = ld.step_invariants(text, mask, id_emb, dtype)

    def labels() -> None:
        maugen.conditioner(text, id_emb, queries)
        out = ld(feats, temb, text, mask, id_emb, queries, invariants)
        core.next_au_state(ld, queries, out.tokens)

    labels()
    return {
        "unet": min(timed(unet, device) for _ in range(repeats)),
        "labels": min(timed(labels, device) for _ in range(5)),
    }


def run_case(case: Case, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    root = write_sd_inpainting(work / case.name, case.name, case.size, device=args.device)
    maugen, stock = build(root, args.device, dtype, args.model)
    setup = time.perf_counter() - t0
    log(f"{case.name}: random SD folder written and loaded in {setup:.0f} s")
    fns = callers(maugen, stock, case.batch, case.size, case.steps, args.guidance, args.device)
    for k, fn in callers(maugen, stock, case.batch, case.size, 1, args.guidance, args.device).items():
        log(f"{case.name}: warm-up {k} (1 step) {timed(fn, args.device):.1f} s")
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    profiles: dict[str, Profile] = {}
    for i in range(case.repeats):
        last = i == case.repeats - 1
        for k, fn in fns.items():
            if last:  # the last round also splits each call's time by component (hooks cost microseconds)
                profiles[k] = Profile(components(maugen, k), args.device)
            try:
                times[k].append(timed(fn, args.device, cpu[k]))
            finally:
                if last:
                    profiles[k].remove()
            log(f"{case.name}: round {i + 1} {k} {times[k][-1]:.1f} s ({cpu[k][-1]:.1f} CPU s)")
    rate = {k: case.batch / min(v) for k, v in times.items()}
    cpu_rate = {k: case.batch / min(v) for k, v in cpu.items()}
    parts = step_parts(maugen, args.profile_size, args.device) if case.name == "sd15" else None
    n_unet = sum(p.numel() for p in maugen.unet.parameters())
    n_extra = sum(p.numel() for m in (maugen.label_decoder, maugen.conditioner) for p in m.parameters())
    ldc = maugen.label_decoder.config
    sides = tapped_sides(maugen.unet, ldc.label_layers)
    label_decoder = argparse.Namespace(
        label_layers=ldc.label_layers, num_heads=ldc.num_heads,
        tokens=[(s // p) ** 2 for s, p in zip(sides, ldc.patch_sizes)],
    )
    return {"case": case, "label_decoder": label_decoder, "rate": rate, "cpu_rate": cpu_rate, "times": times,
            "profiles": profiles, "parts": parts, "setup": setup,
            "n_unet": n_unet, "n_extra": n_extra}


def log(line: str) -> None:
    """Progress on stderr, so the report on stdout stays clean."""
    print(line, file=sys.stderr, flush=True)


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    c: Case = r["case"]
    rate = r["rate"]
    ld = r["label_decoder"]
    print(
        f"\n[{c.name}] {c.size} px, batch {c.batch}, {c.steps} steps DPM-Solver++, guidance {args.guidance} at every "
        f"step, {args.dtype}, {args.device}, {torch.get_num_threads()} threads; UNet {r['n_unet'] / 1e6:.1f}M params, "
        f"MAUGen label decoder + conditioner {r['n_extra'] / 1e6:.1f}M (label layers {list(ld.label_layers)}, "
        f"patch tokens {ld.tokens}, {ld.num_heads} heads; setup {r['setup']:.0f} s)"
    )
    for k in ("stock", "maugen"):
        ts = ", ".join(f"{t:.2f}" for t in r["times"][k])
        print(f"  {k:<7} {rate[k]:8.3f} images/s   (calls: {ts} s)")
    print(f"  ratio MAUGen / stock {rate['maugen'] / rate['stock']:.3f}   (bar: >= 0.85)")
    if args.device == "cpu":
        c = r["cpu_rate"]
        print(
            f"  per CPU second: stock {c['stock']:.3f}, maugen {c['maugen']:.3f} images; "
            f"ratio {c['maugen'] / c['stock']:.3f} (what other load on the machine moves least)"
        )
    for k in ("stock", "maugen"):
        prof, total = r["profiles"][k], r["times"][k][-1]
        parts = "  ".join(f"{n} {prof.total[n]:.2f}s/{prof.calls[n]}" for n in prof.total)
        inside = sum(prof.total.values())  # none of the components nest
        print(f"  last call of {k:<7} {total:.2f} s: {parts}  other {total - inside:.2f}s  (seconds/calls)")
    if r["parts"]:
        p = r["parts"]
        print(
            f"  one step at {args.profile_size} px, batch 1: UNet with guidance (2 rows) {p['unet'] * 1e3:.0f} ms, "
            f"label decoder + conditioner + mutual-conditioning EMA {p['labels'] * 1e3:.1f} ms = "
            f"{p['labels'] / p['unet']:.3f} of the UNet"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="small,sd15", help="comma-separated: small, sd15, toy")
    ap.add_argument("--small-size", type=int, default=128)
    ap.add_argument("--small-steps", type=int, default=BUILD_STEPS)
    ap.add_argument("--small-batch", type=int, default=4)
    ap.add_argument(
        "--sd15-size", type=int, default=128,
        help="px; SD 1.5 works at 512: smaller keeps a CPU run short and is the harder case for MAUGen (its label "
        "decoder's cost does not shrink with the image, the UNet's does)",
    )
    ap.add_argument("--sd15-steps", type=int, default=BUILD_STEPS)
    ap.add_argument("--sd15-batch", type=int, default=1)
    ap.add_argument("--sd15-repeats", type=int, default=2)
    ap.add_argument("--profile-size", type=int, default=512, help="px of the one-step UNet vs label decoder timing")
    ap.add_argument("--guidance", type=float, default=6.0, help="the build's maugen.guidance_scale")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--work", help="folder for the random SD folders (default: a temporary one)")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="MAUGen architecture key (MAUGenConfig, the training config's model section) over its defaults, "
        "e.g. tokens_per_side=16",
    )
    args = ap.parse_args()
    args.model = {k.removeprefix("model."): yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = {
        "small": Case("small", args.small_size, args.small_steps, args.small_batch, args.repeats),
        "sd15": Case("sd15", args.sd15_size, args.sd15_steps, args.sd15_batch, args.sd15_repeats),
        "toy": Case("toy", 64, 2, 2, args.repeats),
    }
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in sizes]
    if unknown:
        ap.error(f"--configs: unknown {unknown}; use small, sd15, toy")
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        print(f"MAUGen vs stock StableDiffusionInpaintPipeline, same weights; torch {torch.__version__}")
        for n in names:
            report(run_case(sizes[n], args, Path(tmp)), args)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
