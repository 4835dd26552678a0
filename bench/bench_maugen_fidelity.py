"""Label fidelity of a MAUGen checkpoint on held-out puppet identities, without building a corpus.

For `--n` held-out identities and grammar prompts of random targets, it samples the checkpoint
and runs the three builtin AU detectors (k=2) and the realism discriminator on the images, then
prints mean F1 (docs/facs.md's definition) of MAUGen's labels vs the prompt targets, of its labels vs
the detector consensus, and of the targets vs the consensus (per AU and mean), the realism
acceptance, what the build's own checks (factory/checks.py, default config) reject and keep, and
the generator's images/s. It samples as a build does by default (`maugen.scheduler`, `steps`,
`guidance_scale`, `guidance_interval`). It tracks a training run between checkpoints (`factory eval` measures a
built corpus); `--grid PNG` saves the first 32 images.

Run: python bench/bench_maugen_fidelity.py --checkpoint RUN/checkpoints/step-0002000/pipeline [--n 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detectors.metrics import AU_KEYS, f1_per_au  # noqa: E402
from detectors.panel import DetectorPanel  # noqa: E402
from factory.candidate import ACCEPTED, Candidate, SampleDetection  # noqa: E402
from factory.checks import REASONS, run_checks  # noqa: E402
from factory.config import FactoryConfig, MAUGenGeneratorConfig  # noqa: E402
from factory.generators import GenerationBatch, GenerationResult, validate_result  # noqa: E402
from factory.sampler import CandidateSpec  # noqa: E402
from pipelines.maugen import MAUGenPipeline  # noqa: E402
from pipelines.maugen.build import SCHEDULERS, set_scheduler  # noqa: E402
from pipelines.prompts import make_expander  # noqa: E402
from pipelines.prompts.targets import random_requests  # noqa: E402
from pipelines.puppet import PuppetRenderer  # noqa: E402
from pipelines.puppet.data import identities  # noqa: E402

_SAMPLING = MAUGenGeneratorConfig()  # sample as a build does unless told otherwise


def fidelity(
    checkpoint: str,
    n: int = 32,
    steps: int = _SAMPLING.steps,
    scheduler: str = _SAMPLING.scheduler,
    guidance: float = _SAMPLING.guidance_scale,
    interval: tuple[float, float] = _SAMPLING.guidance_interval,
) -> tuple[dict[str, float], np.ndarray]:
    """Sample `n` held-out identities with random grammar prompts; (numbers, images)."""
    pipe = MAUGenPipeline.from_pretrained(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, scheduler)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    people = identities(n, "heldout", seed=3)
    exemplars, masks = PuppetRenderer(size=size).exemplars(people)
    requests = random_requests(n, seed=11)
    targets = np.array([r.intensity for r in requests]) >= 2
    cfg = FactoryConfig()  # the build's default checks and thresholds
    expansions, _ = make_expander(cfg.expand).expand_batch(requests)
    prompts = [e.text for e in expansions]
    limit = pipe.tokenizer.model_max_length
    cut = np.array([len(ids) > limit for ids in pipe.tokenizer(prompts, truncation=False, verbose=False).input_ids])
    t = time.perf_counter()
    out = pipe(
        prompts,
        exemplars,
        num_inference_steps=steps,
        mask_image=masks,
        guidance_scale=guidance,
        guidance_interval=interval,
        generator=[torch.Generator().manual_seed(i) for i in range(n)],
    )
    rate = n / (time.perf_counter() - t)
    nan = float("nan")
    panel = DetectorPanel(["builtin:au-cnn", "builtin:au-resnet", "builtin:au-vit"], 2, realism="builtin:realism")
    det = panel.detect(out.images)
    # the ceiling: the same people and targets rendered by the puppet renderer, through the same panel
    rendered = panel.detect(PuppetRenderer(size=size).render_batch(people, [r.intensity for r in requests]))
    labels = out.au_occurrence >= 0.5
    consensus = det.consensus.occurrence
    cands = _candidates(requests, people, expansions, out, det, size)
    rejected = run_checks(cands, cfg)  # the build's checks, in the build's order
    passed = np.array([c.fate == ACCEPTED for c in cands])
    real = det.realism >= cfg.checks.realism
    per_au = {
        "labels_vs_targets": f1_per_au(targets, labels),
        "labels_vs_consensus": f1_per_au(consensus, labels),
        "targets_vs_consensus": f1_per_au(consensus, targets),
    }
    numbers = {
        **{f"f1_{k}": v.mean for k, v in per_au.items()},
        **{f"f1_{k}_{au}": float(f) for k, v in per_au.items() for au, f in zip(AU_KEYS, v.per_au)},
        "realism_mean": float(np.mean(det.realism)),
        "realism_accepted": float(np.mean(real)),
        "f1_targets_vs_consensus_on_renders": f1_per_au(rendered.consensus.occurrence, targets).mean,
        "realism_accepted_on_renders": float(np.mean(rendered.realism >= cfg.checks.realism)),
        **{f"rejected_{r}": rejected[r] / n for r in REASONS if r != "over_quota"},
        "pass_all_checks": float(passed.mean()),
        "images_per_s": rate,
        # prompts longer than the text encoder reads: the model never saw their end
        "text_encoder_tokens": limit,
        "prompts_cut": float(cut.mean()),
    }
    for name, rows in (("cut", cut), ("uncut", ~cut)):
        f1 = f1_per_au(consensus[rows], targets[rows]).mean if rows.any() else nan
        numbers[f"f1_targets_vs_consensus_{name}"] = f1
        numbers[f"pass_all_checks_{name}"] = float(passed[rows].mean()) if rows.any() else nan
    return numbers, out.images


def _candidates(requests, people, expansions, out, det, size: int) -> list[Candidate]:
    """The samples as the build's candidate records (one plan cell: the bench has no quotas)."""
    specs = [
        CandidateSpec(f"bench-{i:05d}", 0, i, r.seed, 0, r.emotion, r.strength, np.array(r.intensity, np.int8), p)
        for i, (r, p) in enumerate(zip(requests, people))
    ]
    batch = GenerationBatch(
        [s.key for s in specs], np.array([s.seed for s in specs]), [e.text for e in expansions],
        np.stack([s.intensity for s in specs]), people,
    )
    result = GenerationResult(out.images, out.au_intensity, out.au_occurrence)
    valid = validate_result(result, batch, size)
    rows = np.cumsum(valid) - 1
    return [
        Candidate(
            spec, e, out.images[i], out.au_intensity[i], out.au_occurrence[i], bool(valid[i]),
            SampleDetection.of(det, int(rows[i])) if valid[i] else None,
        )
        for i, (spec, e) in enumerate(zip(specs, expansions))
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="saved MAUGenPipeline directory")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--steps", type=int, default=_SAMPLING.steps, help="default: the build's maugen.steps")
    ap.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=_SAMPLING.scheduler)
    ap.add_argument("--guidance", type=float, default=_SAMPLING.guidance_scale)
    ap.add_argument(
        "--guidance-interval", type=float, nargs=2, default=_SAMPLING.guidance_interval, metavar=("LO", "HI")
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid", help="save the first 32 images to this PNG")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    interval = (args.guidance_interval[0], args.guidance_interval[1])
    r, images = fidelity(args.checkpoint, args.n, args.steps, args.scheduler, args.guidance, interval)
    print(
        f"{args.checkpoint}: {args.n} held-out identities, {args.scheduler} {args.steps} steps, "
        f"guidance {args.guidance} at t/T in [{interval[0]}, {interval[1]}], {args.threads} threads"
    )
    print(f"F1 labels vs prompt targets   {r['f1_labels_vs_targets']:.3f}")
    print(f"F1 labels vs consensus        {r['f1_labels_vs_consensus']:.3f}")
    print(f"F1 prompt targets vs consensus {r['f1_targets_vs_consensus']:.3f}")
    print("per AU            " + " ".join(f"{k:>5}" for k in AU_KEYS))
    for k in ("labels_vs_targets", "labels_vs_consensus", "targets_vs_consensus"):
        print(f"{k:<18}" + " ".join(f"{r[f'f1_{k}_{au}']:5.2f}" for au in AU_KEYS))
    print(f"realism mean {r['realism_mean']:.3f}, accepted (>= {FactoryConfig().checks.realism}) {r['realism_accepted']:.2f}")
    print(
        f"ceiling, the same targets rendered by the puppet renderer: F1 targets vs consensus "
        f"{r['f1_targets_vs_consensus_on_renders']:.3f}, realism accepted {r['realism_accepted_on_renders']:.2f}"
    )
    funnel = ", ".join(f"{k[len('rejected_'):]} {v:.2f}" for k, v in r.items() if k.startswith("rejected_"))
    print(f"the build's checks (default config), share rejected by each in order: {funnel}; pass all {r['pass_all_checks']:.2f}")
    print(
        f"prompts longer than the text encoder's {r['text_encoder_tokens']} tokens (cut): {r['prompts_cut']:.2f}; "
        f"F1 targets vs consensus cut {r['f1_targets_vs_consensus_cut']:.3f} / uncut "
        f"{r['f1_targets_vs_consensus_uncut']:.3f}; pass all checks cut {r['pass_all_checks_cut']:.2f} / "
        f"uncut {r['pass_all_checks_uncut']:.2f}"
    )
    print(f"generator {r['images_per_s']:.2f} images/s")
    if args.grid:
        rows = [np.concatenate(list(images[i : i + 8]), 1) for i in range(0, min(32, args.n) - 7, 8)]
        Image.fromarray(np.concatenate(rows, 0)).save(args.grid)


if __name__ == "__main__":
    main()
