"""The steps of bench/gpu.sh: generator images/s (stock diffusers inpainting vs MAUGen), detector images/s,
and the accepted samples/s of a short `factory build`. Random weights, local folders, nothing downloaded.

    python bench/bench_gpu.py generator --work DIR [--device cuda] [--shape sd15] [--size 512]
        [--batches 8,16,32] [--dtypes float16,bfloat16] [--variants base,pab,compile] [--budget-s 270]
    python bench/bench_gpu.py detectors [--device cuda] [--batches 64,256] [--size 512]
    python bench/bench_gpu.py build --checkpoint DIR --out DIR [--device cuda] [--target 96]

`generator` writes a random-weight SD inpainting folder of `--shape` (bench/sd_random.py), builds MAUGen
from it (`from_stable_diffusion`) and a stock `StableDiffusionInpaintPipeline` on its own UNet loaded
from the same folder (VAE, text encoder and tokenizer shared), then times one call of each per
(dtype, batch, variant) after a 2-step warm-up at the same shapes: guidance at every step for both,
and one more MAUGen row with the build's own sampling (its guidance interval). Variants: base (SDPA),
pab (diffusers' Pyramid Attention Broadcast, `maugen.cache=pab`), compile (torch.compile of the UNet,
`maugen.compile`; first the compilation is timed on its own), channels_last on in every variant on a
GPU. Rows print as they are measured; once `--budget-s` is spent the rest are listed as skipped. It
saves the MAUGen as a checkpoint in WORK/maugen for `build`.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from factory.config import MAUGenGeneratorConfig  # noqa: E402

BUILD = MAUGenGeneratorConfig()  # the build's sampling: steps, guidance, its interval


def say(line: str) -> None:
    print(line, flush=True)


def generator(args: argparse.Namespace) -> None:
    from bench_maugen_vs_diffusers import build as pipelines, callers, timed  # diffusers: this step only
    from sd_random import write_sd_inpainting

    from pipelines.maugen.speed import apply_speedups

    def calls(maugen: Any, stock: Any, batch: int, steps: int) -> dict[str, Any]:
        interval = BUILD.guidance_interval
        return callers(maugen, stock, batch, args.size, steps, BUILD.guidance_scale, args.device, interval)

    start = time.perf_counter()
    work = Path(args.work)
    t = time.perf_counter()
    root = write_sd_inpainting(work / "sd", args.shape, args.size, device=args.device)
    took = time.perf_counter() - t
    say(f"generator: random-weight {args.shape} inpainting folder at {args.size} px written in {took:.0f} s")
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = args.dtypes.split(",")
    variants = args.variants.split(",")
    nhwc = args.device == "cuda"
    say(
        f"generator: {args.shape} at {args.size} px, {args.steps} steps DPM-Solver++, guidance {BUILD.guidance_scale} "
        f"(at every step; maugen-build: t/T in {list(BUILD.guidance_interval)}), device {_device_name(args.device)}, "
        f"SDPA{', channels_last' if nhwc else ''}; images/s of one call after a warm-up at its shapes"
    )
    say(f"{'variant':<8} {'dtype':<9} {'batch':>5} {'stock':>8} {'maugen':>8} {'ratio':>6} {'maugen-build':>12}")
    saved = False
    for variant in variants:
        for dtype_name in dtypes:
            if variant != "base" and dtype_name != dtypes[0]:
                continue  # pab and compile: the first dtype only
            dtype = getattr(torch, dtype_name)
            maugen, stock = pipelines(root, args.device, dtype, own_unet=True)
            if not saved:
                maugen.save_pretrained(work / "maugen")  # the build step's checkpoint
                saved = True
            extra = ""
            if variant in ("pab", "compile"):
                for p in (maugen, stock):
                    apply_speedups(p, channels_last=nhwc, cache="pab" if variant == "pab" else "none",
                                   compile=variant == "compile", compile_backend=args.compile_backend)
            elif nhwc:
                for p in (maugen, stock):
                    apply_speedups(p, channels_last=True)
            for batch in batches if variant == "base" else batches[len(batches) // 2 : len(batches) // 2 + 1]:
                if time.perf_counter() - start > args.budget_s:
                    say(f"{variant:<8} {dtype_name:<9} {batch:>5} skipped: --budget-s {args.budget_s:.0f} is spent")
                    continue
                rate: dict[str, float] = {}
                warm_up = calls(maugen, stock, batch, 2)
                for kind, fn in calls(maugen, stock, batch, args.steps).items():
                    warm = timed(warm_up[kind], args.device)
                    if variant == "compile" and kind != "maugen-build":
                        extra += f" {kind} compiled and warmed up in {warm:.0f} s;"
                    rate[kind] = batch / timed(fn, args.device)
                say(
                    f"{variant:<8} {dtype_name:<9} {batch:>5} {rate['stock']:>8.2f} {rate['maugen']:>8.2f} "
                    f"{rate['maugen'] / rate['stock']:>6.2f} {rate['maugen-build']:>12.2f}"
                )
            if extra:
                say(f"  ({variant}:{extra.rstrip(';')})")
            del maugen, stock
            if args.device == "cuda":
                torch.cuda.empty_cache()
    say(f"generator: done in {time.perf_counter() - start:.0f} s")


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"cpu ({torch.get_num_threads()} threads)"


def detectors(args: argparse.Namespace) -> None:
    import onnxruntime as ort

    from detectors.panel import DetectorPanel
    from factory.config import DetectConfig

    d = DetectConfig()
    have = ort.get_available_providers()  # the panel takes CUDA first where it is there (detectors/runtime.py)
    if args.device == "cuda" and "CUDAExecutionProvider" not in have:
        say(f"detectors: no CUDA provider in this onnxruntime ({', '.join(have)}): install onnxruntime-gpu "
            "(pip install -e '.[gpu]'); measuring the CPU provider instead")
    images = np.random.default_rng(0).integers(0, 256, (max(int(b) for b in args.batches.split(",")), args.size,
                                                         args.size, 3), dtype=np.uint8)
    panel = DetectorPanel(d.au_detectors, d.min_agree, realism=d.realism)
    for batch in (int(b) for b in args.batches.split(",")):
        for m in [*panel.detectors, panel.realism]:
            m.batch_size = batch  # detect.batch_size: images per session call
        x = images[:batch]
        panel.detect(x)  # warm-up
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < args.seconds:
            panel.detect(x)
            n += batch
        rate = n / (time.perf_counter() - t)
        first = panel.detectors[0]
        say(
            f"detectors: {len(panel.detectors)} AU detectors + realism ({', '.join(d.au_detectors)}, {d.realism}) on "
            f"{args.size} px images, batch {batch}: {rate:.0f} images/s through the panel "
            f"({first.providers[0]}, IO binding {'on' if first.io_binding else 'off'})"
        )


SAMPLES = re.compile(r": (\d+)/(\d+) shards, (\d+)/(\d+) samples .* in ([\d.]+) s; rejected: (.*)$")
SHARDS_RAN = re.compile(r"shards ran ([\d.]+) s")


def build(args: argparse.Namespace) -> None:
    """A short `factory build` of the checkpoint; accepted samples/s over the time shards ran."""
    gpu = args.device == "cuda"
    sets = [
        f"maugen.checkpoint={args.checkpoint}", f"maugen.device={args.device}", f"maugen.dtype={args.dtype}",
        f"maugen.batch_size={args.batch}", f"maugen.steps={args.steps}", f"plan.candidate_batch={args.batch}",
        # a random-weight model's labels and faces agree with nothing: the checks pass everything, so this
        # measures the graph (generate, detect, write) at this size; a trained model's acceptance multiplies it
        "checks.label_prompt_jaccard=0", "checks.label_consensus_jaccard=0", "checks.realism=0",
        f"detect.batch_size={args.detect_batch}", "runtime.progress=false", "runtime.num_generators=1",
        f"runtime.max_shards_in_flight={args.shards_in_flight}",
    ]
    if gpu:  # one GPU: the generator and the detectors share it (fractional Ray GPUs)
        sets += ["runtime.generator_gpus=0.75", "runtime.detector_gpus=0.25", "runtime.num_detectors=1"]
    else:
        sets += ["runtime.object_store_mb=100", "runtime.generator_cpus=1", "runtime.detector_cpus=0.5",
                 "runtime.shard_worker_cpus=0.25"]
    cmd = [sys.executable, "-m", "factory.cli", "build", "--target", str(args.target), "--shard-size",
           str(args.shard_size), "--out", args.out, "--new-build"]
    for s in sets:
        cmd += ["--set", s]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t
    lines = proc.stderr.splitlines()
    found = [m for m in map(SAMPLES.search, lines) if m]
    ran = [m for m in map(SHARDS_RAN.search, lines) if m]
    if proc.returncode != 0 or not found or not ran:
        say(f"build: factory build failed (exit {proc.returncode}); its last lines:")
        for line in lines[-12:]:
            say(f"  {line}")
        raise SystemExit(1)
    accepted, seconds = int(found[-1].group(3)), float(ran[-1].group(1))
    stats = sorted(Path(args.out, "shards").glob("*.stats.json"))
    candidates = sum(int(json.loads(p.read_text()).get("candidates", 0)) for p in stats)
    busy = [line.strip() for line in lines if line.strip().startswith(("generator ", "detector "))]
    say(
        f"build: {accepted} accepted samples ({candidates} candidates) in {seconds:.1f} s of shards = "
        f"{accepted / seconds:.2f} accepted samples/s ({wall:.0f} s with Ray's start and model loading); "
        f"checks off, {args.steps} steps, maugen.batch_size {args.batch}"
    )
    for line in busy:
        say(f"  {line}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step", required=True)
    g = sub.add_parser("generator")
    g.add_argument("--work", required=True)
    g.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    g.add_argument("--shape", default="sd15", choices=("sd15", "small", "toy"))
    g.add_argument("--size", type=int, default=512)
    g.add_argument("--steps", type=int, default=BUILD.steps)
    g.add_argument("--batches", default="8,16,32")
    g.add_argument("--dtypes", default="float16,bfloat16")
    g.add_argument("--variants", default="base,pab,compile")
    g.add_argument("--compile-backend", default="inductor")
    g.add_argument("--budget-s", type=float, default=270.0)
    d = sub.add_parser("detectors")
    d.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    d.add_argument("--batches", default="64,256")
    d.add_argument("--size", type=int, default=512)
    d.add_argument("--seconds", type=float, default=5.0)
    b = sub.add_parser("build")
    b.add_argument("--checkpoint", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    b.add_argument("--dtype", default="float16")
    b.add_argument("--steps", type=int, default=BUILD.steps)
    b.add_argument("--batch", type=int, default=16)
    b.add_argument("--detect-batch", type=int, default=64)
    b.add_argument("--target", type=int, default=96)
    b.add_argument("--shard-size", type=int, default=48)
    b.add_argument("--shards-in-flight", type=int, default=2)
    b.add_argument("--timeout", type=float, default=150.0)
    args = ap.parse_args()
    {"generator": generator, "detectors": detectors, "build": build}[args.step](args)


if __name__ == "__main__":
    main()
