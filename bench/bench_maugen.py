"""MAUGen sampling speed: images/s by scheduler, step count and guidance, as ratios from one run.

Times `MAUGenPipeline.__call__` on puppet exemplars (batch `--batch`) for the generator's default
(DPM-Solver at 15 steps, guidance only at low noise), the same with guidance at every step, DDIM at
25 steps (the default before), DPM-Solver at 10 steps, and DPM-Solver without classifier-free
guidance (one UNet pass per step instead of two), and prints each one's images/s and its ratio to
the default.

Run: python bench/bench_maugen.py --checkpoint runs/maugen-tiny/final [--batch 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factory.config import MAUGenGeneratorConfig  # noqa: E402
from pipelines.maugen import MAUGenPipeline  # noqa: E402
from pipelines.maugen.build import set_scheduler  # noqa: E402
from pipelines.puppet import PuppetRenderer  # noqa: E402
from pipelines.puppet.data import identities  # noqa: E402

_D = MAUGenGeneratorConfig()
_ALL = (0.0, 1.0)
#: (scheduler, steps, guidance, guidance interval); the first is the build's default
CASES = (
    (_D.scheduler, _D.steps, _D.guidance_scale, _D.guidance_interval),
    ("dpm", 15, _D.guidance_scale, _ALL),
    ("ddim", 25, _D.guidance_scale, _ALL),
    ("dpm", 10, _D.guidance_scale, _D.guidance_interval),
    ("dpm", 15, 1.0, _ALL),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = MAUGenPipeline.from_pretrained(args.checkpoint)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    people = identities(args.batch, "heldout")
    r = PuppetRenderer(size=size)
    ex, masks = r.exemplars(people)
    prompts = ["A face showing a clear smile with the lips apart."] * len(people)
    base_config = pipe.scheduler.config
    rates = []
    for sched, steps, guidance, interval in CASES:
        set_scheduler(pipe, sched, base_config)
        pipe(prompts[:2], ex[:2], num_inference_steps=2, mask_image=masks[:2], guidance_scale=guidance)  # warm-up
        t = time.perf_counter()
        for _ in range(args.repeats):
            pipe(
                prompts,
                ex,
                num_inference_steps=steps,
                mask_image=masks,
                guidance_scale=guidance,
                guidance_interval=interval,
                generator=torch.Generator().manual_seed(0),
            )
        rates.append(args.batch * args.repeats / (time.perf_counter() - t))
    print(
        f"MAUGen sampling, {args.checkpoint}, batch {args.batch}, {size} px, {torch.get_num_threads()} threads, "
        f"device {pipe.device}"
    )
    print(f"{'scheduler':<10} {'steps':>5} {'guidance':>8} {'at t/T':>10} {'img/s':>8} {'vs default':>10}")
    for (sched, steps, guidance, (lo, hi)), rate in zip(CASES, rates):
        print(f"{sched:<10} {steps:>5} {guidance:>8} {f'{lo}-{hi}':>10} {rate:>8.2f} {rate / rates[0]:>10.2f}")


if __name__ == "__main__":
    main()
