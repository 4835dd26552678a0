"""What one MAUGen sampling step costs over one plain UNet step of the same configuration.

The MAUGen step is measured inside the real `MAUGenPipeline.__call__`: the time of a call with
`--steps` steps minus a call with 1 step, divided by the difference, so prompt/identity encoding
and decoding drop out. It holds the conditioner ([C_T, C_ID, C_AU]), the UNet with its feature
taps and the MRL processors, the Conditional Label Decoder (IDM, LGFE, heads), the mutual
conditioning EMA, the scheduler step and the inpainting composite.

The plain step is the same UNet (same weights, same in_channels) rebuilt from its config with
diffusers' default attention processors and no hooks, reading the text tokens alone, plus the
same scheduler step: what a text-to-image UNet of this size pays. Both use the same guidance
(2 UNet rows per sample with guidance > 1). The ratio is the cost of CLD, IDM and mutual
conditioning; the aim is under 1.25.

Run: python bench/bench_maugen_step.py [--checkpoint DIR] [--batch 8] [--steps 11] [--repeats 3]
Without --checkpoint it builds the tiny-puppet architecture with fresh weights (timing does not
depend on the weights); `--set model.block_out_channels=[64,128,192,256]` tries a wider UNet.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detectors.builtin import torch_identity_encoder  # noqa: E402
from pipelines.maugen import MAUGenPipeline, core  # noqa: E402
from pipelines.maugen.build import MAUGenConfig, build_pipeline  # noqa: E402
from pipelines.puppet import PuppetRenderer  # noqa: E402
from pipelines.puppet.data import identities  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "pipelines/maugen/configs/tiny-puppet.yaml"


def _pipeline(args) -> MAUGenPipeline:
    if args.checkpoint:
        return MAUGenPipeline.from_pretrained(args.checkpoint)
    model = dict(yaml.safe_load(RECIPE.read_text())["model"])
    for item in args.set:
        key, _, value = item.partition("=")
        model[key.removeprefix("model.")] = yaml.safe_load(value)
    cfg = MAUGenConfig(**model)
    return build_pipeline(cfg, torch_identity_encoder(cfg.identity_encoder))


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a saved MAUGenPipeline (default: fresh tiny-puppet architecture)")
    ap.add_argument("--set", action="append", default=[], help="model.KEY=VALUE over the tiny-puppet recipe")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=11)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the per-step time is a difference against a 1-step call)")
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = _pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    people = identities(args.batch, "heldout")
    renderer = PuppetRenderer(size=size)
    exemplars, masks = renderer.exemplars(people)
    prompts = ["A face showing a clear smile with the lips apart."] * len(people)

    def call(steps: int):
        return lambda: pipe(
            prompts, exemplars, num_inference_steps=steps, mask_image=masks, guidance_scale=args.guidance,
            generator=torch.Generator().manual_seed(0),
        )

    call(2)()  # warm-up
    t_many, t_one = _best(call(args.steps), args.repeats), _best(call(1), args.repeats)
    maugen_step = (t_many - t_one) / (args.steps - 1)

    # the plain UNet: same weights and config, diffusers' default processors, no hooks, C_T only
    plain = UNet2DConditionModel.from_config(pipe.unet.config)
    plain.load_state_dict(pipe.unet.state_dict())
    plain.eval()
    dev, dtype = pipe.device, pipe.unet.dtype
    text, _ = core.encode_prompt(pipe.tokenizer, pipe.text_encoder, prompts, dev)
    rows = 2 if args.guidance > 1.0 else 1
    ehs = torch.cat([text] * rows).to(dtype)
    sf = pipe.vae_scale_factor
    latents = torch.randn(args.batch, pipe.latent_channels, size // sf, size // sf, device=dev, dtype=dtype)
    x_in = torch.cat([latents, torch.ones_like(latents[:, :1]), latents], 1) if pipe.inpainting else latents
    x_in = torch.cat([x_in] * rows)
    pipe.scheduler.set_timesteps(args.steps, device=dev)
    t = pipe.scheduler.timesteps[0]

    def plain_step():
        for _ in range(args.steps - 1):
            eps = plain(x_in, t, encoder_hidden_states=ehs).sample
            if rows == 2:
                eps_c, eps_u = eps.chunk(2)
                eps = eps_u + args.guidance * (eps_c - eps_u)
            pipe.scheduler.step(eps, t, latents)

    plain_step()  # warm-up
    plain_time = _best(plain_step, args.repeats) / (args.steps - 1)

    n_unet = sum(p.numel() for p in pipe.unet.parameters())
    n_extra = sum(p.numel() for m in (pipe.label_decoder, pipe.conditioner) for p in m.parameters())
    print(
        f"MAUGen step vs plain UNet step: {args.checkpoint or 'tiny-puppet architecture ' + str(args.set)}, "
        f"batch {args.batch}, {size} px, guidance {args.guidance}, {torch.get_num_threads()} threads, "
        f"device {dev}; UNet {n_unet / 1e6:.2f}M params, label decoder + conditioner {n_extra / 1e6:.2f}M"
    )
    print(f"{'plain UNet step':<22} {plain_time * 1e3:9.1f} ms")
    print(f"{'MAUGen step':<22} {maugen_step * 1e3:9.1f} ms")
    print(f"{'ratio MAUGen / plain':<22} {maugen_step / plain_time:9.3f}   (aim: < 1.25)")
    print(f"(MAUGen step from calls of {args.steps} and 1 steps: {t_many:.3f} s and {t_one:.3f} s, best of {args.repeats})")


if __name__ == "__main__":
    main()
