"""Label fidelity of a MAUGen checkpoint on identities it never trained on, without building a corpus.

It draws `--n` candidates as a build does (`--sampling build`: factory.sampler.ShardSampler over shards
0, 1, ... of the default config; `random`: held-out identities with random grammar targets, as this
bench did before issue 22), writes their prompts within the text encoder's token budget as the build
does (`--no-budget`: the grammar's full prompts, which the encoder cuts), samples the checkpoint as a
build does (`maugen.scheduler`, `steps`, `guidance_scale`, `guidance_interval`), and judges the images twice:

- the build's filter panel (detect.au_detectors, k = detect.min_agree, and detect.realism): mean F1
  (docs/facs.md's definition) of MAUGen's labels vs the prompt targets, of its labels vs the consensus
  and of the targets vs the consensus (per AU and mean), the realism acceptance, what the build's own
  checks (factory/checks.py, default config) reject and keep. Not independent: MAUGen's image-label loss
  was trained on this consensus and the build filters with it, so the model may have learnt to please it.
- an independent evaluator that neither MAUGen's training nor the build's filters use (`--evaluator`,
  `--identity-evaluator`; detectors/models/README.md): F1 of MAUGen's labels and of the targets vs its
  AU occurrence, and each image's identity similarity to its exemplar.

The ceiling of each is the same identities and targets rendered by the puppet renderer. Build identities
come from each candidate's own stream of build.seed (sample_identity(default_rng(derive_seed(shard seed,
index)))), not from pipelines/puppet/data.py's `train` stream that MAUGen's PuppetFaceDataset trains on;
`train_identity_overlap` counts any that MAUGen did train on (its train_config.yaml's data section).
It tracks a training run between checkpoints (`factory eval` measures a built corpus); `--json` logs the
numbers with the command that made them; `--grid PNG` saves the first 32 images.

The generator's throughput switches (`--dtype bfloat16`, `--attention eager`, `--channels-last`, `--compile`,
`--cache pab [--cache-skip N]`, as the `maugen` config section names them) are applied as the generator
actor applies them, so what each costs in label fidelity is one run with and one without it.

Run: python bench/bench_maugen_fidelity.py --checkpoint RUN/checkpoints/step-0002000/pipeline [--n 256]
     [--sampling build|random] [--no-budget] [--evaluator SPEC] [--identity-evaluator SPEC] [--json OUT.json]
     [--dtype bfloat16] [--cache pab] ...
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detectors.builtin import resolve  # noqa: E402
from detectors.identity import OnnxIdentityEncoder, cosine  # noqa: E402
from detectors.metrics import AU_KEYS, f1_per_au  # noqa: E402
from detectors.panel import Detection, DetectorPanel, model_hashes  # noqa: E402
from factory.candidate import ACCEPTED, Candidate, SampleDetection  # noqa: E402
from factory.checks import REASONS, run_checks  # noqa: E402
from factory.config import FactoryConfig, MAUGenGeneratorConfig  # noqa: E402
from factory.garble import BROKEN_RESIDUAL, REGIONS, GarbleMeter  # noqa: E402
from factory.generators import GenerationBatch, GenerationResult, validate_result  # noqa: E402
from factory.identities import Exemplar  # noqa: E402
from factory.plan import Plan  # noqa: E402
from factory.sampler import CandidateSpec, ShardSampler  # noqa: E402
from pipelines.maugen import MAUGenPipeline  # noqa: E402
from pipelines.maugen.pipeline import MAUGenPipelineOutput  # noqa: E402
from pipelines.maugen.build import SCHEDULERS, set_scheduler  # noqa: E402
from pipelines.maugen.speed import ATTENTION, CACHES, apply_speedups  # noqa: E402
from pipelines.maugen.data.puppet import person_id  # noqa: E402
from pipelines.maugen.train import DataConfig  # noqa: E402
from pipelines.prompts import TokenBudget, make_expander  # noqa: E402
from pipelines.prompts.targets import random_requests  # noqa: E402
from pipelines.prompts.types import Expansion, ExpansionRequest  # noqa: E402
from pipelines.puppet import PuppetIdentity, PuppetRenderer  # noqa: E402
from pipelines.puppet.data import identities  # noqa: E402

_SAMPLING = MAUGenGeneratorConfig()  # sample as a build does unless told otherwise
EVALUATOR = "builtin:eval-au"
IDENTITY_EVALUATOR = "builtin:eval-identity"


def build_candidates(n: int, cfg: FactoryConfig, size: int) -> tuple[list[CandidateSpec], list[int]]:
    """`n` candidates a build of `cfg` draws, seeded as the build seeds them, with the plan's mix of cells.

    Each shard's ShardSampler draws its rounds as in a build, every candidate recorded as passing, so it
    draws its quotas (a build draws more of the cells its checks reject, so its candidates pass a little
    less often than these). Shards 0, 1, ... are drawn until there are `n`, of a plan whose target is
    raised when it has too few (a shard's quotas and seed depend on its index and build.seed only), and
    a seeded random `n` of them are taken: a round covers cells in index order, so a prefix would hold
    few of the emotions.
    """
    shards = -(-n // cfg.build.shard_size)
    target = max(cfg.build.target, shards * cfg.build.shard_size)
    plan = Plan(cfg.model_copy(update={"build": cfg.build.model_copy(update={"target": target})}))
    specs: list[CandidateSpec] = []
    for i in range(shards):
        sampler = ShardSampler(plan.shard(i), cfg, size)
        while not sampler.done:
            drawn = sampler.draw()
            sampler.record(drawn, np.ones(len(drawn), dtype=bool))
            specs += drawn
    specs = [specs[i] for i in np.sort(np.random.default_rng(0).permutation(len(specs))[:n])]
    return specs, [s.seed for s in specs]


def random_candidates(n: int) -> tuple[list[CandidateSpec], list[int]]:
    """Held-out identities with random grammar targets and generator seeds 0..n-1: what this bench
    sampled before issue 22, so its earlier numbers can be compared."""
    people = identities(n, "heldout", seed=3)
    specs = [
        CandidateSpec(f"bench-{i:05d}", 0, i, r.seed, 0, r.emotion, r.strength, np.array(r.intensity, np.int8), p)
        for i, (r, p) in enumerate(zip(random_requests(n, seed=11), people))
    ]
    return specs, list(range(n))


SAMPLINGS = ("build", "random")


def training_overlap(checkpoint: str, people: Sequence[PuppetIdentity]) -> float:
    """How many of `people` MAUGen trained on: the puppet identities of the train_config.yaml found in the
    checkpoint or the run folder above it; NaN when there is none, or it trained on no puppet data."""
    here = Path(checkpoint).resolve()
    found = [p / "train_config.yaml" for p in (here, *here.parents[:3]) if (p / "train_config.yaml").is_file()]
    if not found:
        return math.nan
    data = DataConfig.model_validate((yaml.safe_load(found[0].read_text()) or {}).get("data") or {})
    if data.kind != "puppet":
        return math.nan
    trained = {person_id(p) for p in identities(data.people, data.split, data.seed)}
    return float(sum(person_id(p) in trained for p in people))


def fidelity(
    checkpoint: str,
    n: int = 32,
    steps: int = _SAMPLING.steps,
    scheduler: str = _SAMPLING.scheduler,
    guidance: float = _SAMPLING.guidance_scale,
    interval: tuple[float, float] = _SAMPLING.guidance_interval,
    sampling: str = "build",
    fit_prompts: bool = True,
    evaluator: str = EVALUATOR,
    identity_evaluator: str = IDENTITY_EVALUATOR,
    realism: str | None = None,
    speed: dict[str, Any] | None = None,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Sample `n` candidates drawn by `sampling` (SAMPLINGS) and judge them; (numbers, images, each image's
    worst garble residual, factory/garble.py). `realism`: the build filter's realism model instead of
    detect.realism's default. `speed`: the generator's throughput switches as the `maugen` config section
    names them (dtype, attention, channels_last, compile, cache, cache_skip), applied as the generator
    actor applies them, so their cost in label fidelity is measured."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    speed = dict(speed or {})
    dtype = getattr(torch, speed.pop("dtype", "float32"))
    pipe = MAUGenPipeline.from_pretrained(checkpoint, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, scheduler)
    apply_speedups(pipe, **speed)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    cfg = _config(realism)  # the build's default plan, checks and thresholds
    # every judge is loaded before sampling, so a missing model fails at once
    panel = DetectorPanel(list(cfg.detect.au_detectors), cfg.detect.min_agree, realism=cfg.detect.realism)
    judge = DetectorPanel([evaluator], 1, realism=None)
    encoder = OnnxIdentityEncoder(str(resolve(identity_evaluator)))
    garble = GarbleMeter(evaluator)
    specs, seeds = build_candidates(n, cfg, size) if sampling == "build" else random_candidates(n)
    people = [s.identity for s in specs]
    intensity = np.stack([s.intensity for s in specs])
    targets = intensity >= 2
    renderer = PuppetRenderer(size=size)
    exemplars, masks = renderer.exemplars(people)
    requests = [
        ExpansionRequest(
            emotion=s.emotion, strength=s.strength, intensity=tuple(int(x) for x in s.intensity), seed=s.seed
        )
        for s in specs
    ]
    budget = TokenBudget.from_tokenizer(Path(checkpoint) / "tokenizer")  # the build's (factory/generators.py)
    expansions, stats = make_expander(cfg.expand, budget=budget if fit_prompts else None).expand_batch(requests)
    prompts = [e.text for e in expansions]
    cut = np.array([not budget.fits(p) for p in prompts])
    t = time.perf_counter()
    out = pipe(
        prompts,
        exemplars,
        num_inference_steps=steps,
        mask_image=masks,
        guidance_scale=guidance,
        guidance_interval=interval,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    )
    rate = n / (time.perf_counter() - t)
    nan = float("nan")
    det = panel.detect(out.images)
    # the ceiling: the same people and targets rendered by the puppet renderer, through the same judges
    renders = renderer.render_batch(people, intensity)
    rendered = panel.detect(renders)
    judged = judge.detect(out.images).consensus.occurrence
    judged_renders = judge.detect(renders).consensus.occurrence
    reference = encoder.embed(exemplars)
    similarity = cosine(encoder.embed(out.images), reference)
    similarity_renders = cosine(encoder.embed(renders), reference)
    verify = encoder.verify_threshold
    labels = out.au_occurrence >= 0.5
    consensus = det.consensus.occurrence
    cands = _candidates(specs, expansions, exemplars, masks, out, det, size)
    rejected = run_checks(cands, cfg)  # the build's checks, in the build's order
    passed = np.array([c.fate == ACCEPTED for c in cands])
    real = det.realism >= cfg.checks.realism
    # explained by the evaluator's reading, the target or MAUGen's labels; renders by the reading alone
    # (its misreadings are the measure's false-positive rate)
    broken, broken_renders = garble(out.images, people, [intensity, out.au_intensity]), garble(renders, people)
    per_au = {
        "labels_vs_targets": f1_per_au(targets, labels),
        "labels_vs_consensus": f1_per_au(consensus, labels),
        "targets_vs_consensus": f1_per_au(consensus, targets),
        "labels_vs_evaluator": f1_per_au(judged, labels),
        "targets_vs_evaluator": f1_per_au(judged, targets),
    }
    ceiling = f1_per_au(judged_renders, targets)  # what the evaluator reads on renders of the same targets
    numbers = {
        **{f"f1_{k}": v.mean for k, v in per_au.items()},
        **{f"f1_{k}_{au}": float(f) for k, v in per_au.items() for au, f in zip(AU_KEYS, v.per_au)},
        "realism_mean": float(np.mean(det.realism)),
        "realism_accepted": float(np.mean(real)),
        "f1_targets_vs_consensus_on_renders": f1_per_au(rendered.consensus.occurrence, targets).mean,
        "realism_accepted_on_renders": float(np.mean(rendered.realism >= cfg.checks.realism)),
        "f1_targets_vs_evaluator_on_renders": ceiling.mean,
        **{f"f1_targets_vs_evaluator_on_renders_{au}": float(f) for au, f in zip(AU_KEYS, ceiling.per_au)},
        "identity_threshold": nan if verify is None else float(verify),
        "identity_mean": float(np.mean(similarity)),
        "identity_verified": nan if verify is None else float(np.mean(similarity >= verify)),
        "identity_mean_on_renders": float(np.mean(similarity_renders)),
        "identity_verified_on_renders": nan if verify is None else float(np.mean(similarity_renders >= verify)),
        "train_identity_overlap": training_overlap(checkpoint, people),
        # visibly broken faces (factory/garble.py): raw, among what passes every check, and on renders
        "broken": float(broken.broken.mean()),
        "broken_passed": float(broken.broken[passed].mean()) if passed.any() else nan,
        "broken_realism_accepted": float(broken.broken[real].mean()) if real.any() else nan,
        "broken_on_renders": float(broken_renders.broken.mean()),
        # can the realism filter see what is broken at all: ROC AUC of its score, sound (1) vs broken (0);
        # 0.5 is a coin, so no threshold on it lowers the delivered broken share
        "realism_auc_sound_vs_broken": _auc(~broken.broken, det.realism),
        **{f"broken_{k}": v for k, v in broken.summary()["by_region"].items()},  # type: ignore[union-attr]
        **{f"rejected_{r}": rejected[r] / n for r in REASONS if r != "over_quota"},
        "pass_all_checks": float(passed.mean()),
        "images_per_s": rate,
        # prompts longer than the text encoder reads: the model never saw their end
        "text_encoder_tokens": budget.max_tokens,
        "prompts_cut": float(cut.mean()),
        "prompts_shortened": stats.shortened / n,  # by the grammar, to fit the budget
    }
    for name, rows in (("cut", cut), ("uncut", ~cut)):
        f1 = f1_per_au(consensus[rows], targets[rows]).mean if rows.any() else nan
        numbers[f"f1_targets_vs_consensus_{name}"] = f1
        numbers[f"pass_all_checks_{name}"] = float(passed[rows].mean()) if rows.any() else nan
    return numbers, out.images, broken.residual.max(axis=1)


def _candidates(
    specs: list[CandidateSpec],
    expansions: list[Expansion],
    exemplars: np.ndarray,
    masks: np.ndarray,
    out: MAUGenPipelineOutput,
    det: Detection,
    size: int,
) -> list[Candidate]:
    """The samples as the build's candidate records (one plan cell: the bench has no quotas)."""
    batch = GenerationBatch(
        [s.key for s in specs], np.array([s.seed for s in specs]), [e.text for e in expansions],
        np.stack([s.intensity for s in specs]), [s.identity for s in specs],
    )
    result = GenerationResult(out.images, out.au_intensity, out.au_occurrence)
    valid = validate_result(result, batch, size)
    rows = np.cumsum(valid) - 1
    return [
        Candidate(
            spec, e, Exemplar(exemplars[i], masks[i], "puppet"), out.images[i], out.au_intensity[i],
            out.au_occurrence[i], bool(valid[i]), SampleDetection.of(det, int(rows[i])) if valid[i] else None,
        )
        for i, (spec, e) in enumerate(zip(specs, expansions))
    ]


def judges(cfg: FactoryConfig, evaluator: str, identity_evaluator: str) -> dict[str, dict[str, str]]:
    """The models behind each number, reference -> sha256, so a logged measurement names its judges."""
    d = cfg.detect
    return {
        "build_panel": model_hashes([*d.au_detectors, *([d.realism] if d.realism else [])]),
        "independent": model_hashes([evaluator, identity_evaluator]),
    }


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC, nan when only one class is present (nothing to rank)."""
    from detectors.metrics import roc_auc

    return roc_auc(labels, scores) if 0 < labels.sum() < len(labels) else math.nan


def _config(realism: str | None) -> FactoryConfig:
    return FactoryConfig() if realism is None else FactoryConfig.model_validate({"detect": {"realism": realism}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="saved MAUGenPipeline directory")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--sampling", choices=SAMPLINGS, default="build", help="candidates as a build draws them")
    ap.add_argument("--no-budget", action="store_true", help="full grammar prompts, cut by the encoder (as before)")
    ap.add_argument("--evaluator", default=EVALUATOR, help="independent AU evaluator (builtin:NAME or a spec path)")
    ap.add_argument("--identity-evaluator", default=IDENTITY_EVALUATOR, help="independent identity encoder")
    ap.add_argument("--steps", type=int, default=_SAMPLING.steps, help="default: the build's maugen.steps")
    ap.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=_SAMPLING.scheduler)
    ap.add_argument("--guidance", type=float, default=_SAMPLING.guidance_scale)
    ap.add_argument(
        "--guidance-interval", type=float, nargs=2, default=_SAMPLING.guidance_interval, metavar=("LO", "HI")
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--realism", help="the build filter's realism model (default: detect.realism's)")
    # the generator's throughput switches (the `maugen` config section; pipelines/maugen/speed.py)
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=_SAMPLING.dtype)
    ap.add_argument("--attention", choices=sorted(ATTENTION), default=_SAMPLING.attention)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet (minutes of compilation first)")
    ap.add_argument("--cache", choices=CACHES, default=_SAMPLING.cache, help="pab: diffusers' attention cache")
    ap.add_argument("--cache-skip", type=int, default=_SAMPLING.cache_skip)
    ap.add_argument("--grid", help="save the first 32 images to this PNG")
    ap.add_argument("--garble-grid", help="save 32 images spread over the garble residual order (mildest first), 3x")
    ap.add_argument("--json", help="write the numbers, the command line and the checkpoint to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = _config(args.realism)
    interval = (args.guidance_interval[0], args.guidance_interval[1])
    speed = {
        "dtype": args.dtype, "attention": args.attention, "channels_last": args.channels_last,
        "compile": args.compile, "cache": args.cache, "cache_skip": args.cache_skip,
    }
    r, images, residual = fidelity(
        args.checkpoint, args.n, args.steps, args.scheduler, args.guidance, interval,
        args.sampling, not args.no_budget, args.evaluator, args.identity_evaluator, args.realism, speed,
    )
    d = cfg.detect
    print(
        f"{args.checkpoint}: {args.n} candidates ({args.sampling} sampling), {args.scheduler} {args.steps} steps, "
        f"guidance {args.guidance} at t/T in [{interval[0]}, {interval[1]}], {args.threads} threads; "
        + ", ".join(f"{k} {v}" for k, v in speed.items())
    )
    print(
        f"judged by: build panel = the build's filters {', '.join(d.au_detectors)} (k={d.min_agree}) + {d.realism}, "
        "not independent (MAUGen's image-label loss trained on them, the build filters with them); "
        f"evaluator = {args.evaluator} (AU) and {args.identity_evaluator} (identity), used by neither"
    )
    overlap = r["train_identity_overlap"]
    print(f"identities MAUGen trained on among them: {'unknown' if math.isnan(overlap) else int(overlap)}")
    print(f"F1 labels vs prompt targets   {r['f1_labels_vs_targets']:.3f}")
    print(f"F1 labels vs consensus        {r['f1_labels_vs_consensus']:.3f}   (build panel)")
    print(f"F1 prompt targets vs consensus {r['f1_targets_vs_consensus']:.3f}   (build panel)")
    print(f"F1 labels vs evaluator        {r['f1_labels_vs_evaluator']:.3f}   (independent)")
    print(f"F1 prompt targets vs evaluator {r['f1_targets_vs_evaluator']:.3f}   (independent)")
    print("per AU               " + " ".join(f"{k:>5}" for k in AU_KEYS))
    rows = [(k, k) for k in ("labels_vs_targets", "labels_vs_consensus", "targets_vs_consensus",
                             "labels_vs_evaluator", "targets_vs_evaluator")]
    rows.append(("targets_vs_evaluator_on_renders", "renders_vs_evaluator"))  # the ceiling: renders of the targets
    for k, label in rows:
        print(f"{label:<21}" + " ".join(f"{r[f'f1_{k}_{au}']:5.2f}" for au in AU_KEYS))
    print(f"realism mean {r['realism_mean']:.3f}, accepted (>= {cfg.checks.realism}) {r['realism_accepted']:.2f}")
    print(
        f"identity similarity to the exemplar (independent): mean {r['identity_mean']:.3f}, "
        f"verified (>= {r['identity_threshold']:.4f}) {r['identity_verified']:.2f}"
    )
    print(
        f"ceiling, the same targets rendered by the puppet renderer: F1 targets vs consensus "
        f"{r['f1_targets_vs_consensus_on_renders']:.3f}, realism accepted {r['realism_accepted_on_renders']:.2f}; "
        f"F1 targets vs evaluator {r['f1_targets_vs_evaluator_on_renders']:.3f}, identity mean "
        f"{r['identity_mean_on_renders']:.3f}, verified {r['identity_verified_on_renders']:.2f}"
    )
    funnel = ", ".join(f"{k[len('rejected_'):]} {v:.2f}" for k, v in r.items() if k.startswith("rejected_"))
    print(f"the build's checks (default config), share rejected by each in order: {funnel}; "
          f"pass all {r['pass_all_checks']:.2f}")
    print(
        f"prompts shortened by the grammar to fit: {r['prompts_shortened']:.2f}; longer than the text encoder's "
        f"{r['text_encoder_tokens']} tokens (cut): {r['prompts_cut']:.2f}; "
        f"F1 targets vs consensus cut {r['f1_targets_vs_consensus_cut']:.3f} / uncut "
        f"{r['f1_targets_vs_consensus_uncut']:.3f}; pass all checks cut {r['pass_all_checks_cut']:.2f} / "
        f"uncut {r['pass_all_checks_uncut']:.2f}"
    )
    print(
        f"visibly broken (factory/garble.py, worst region residual >= {BROKEN_RESIDUAL:g}, judged by the evaluator "
        f"and the renderer): raw {r['broken']:.2f}, passing every check {r['broken_passed']:.2f}, realism-accepted "
        f"{r['broken_realism_accepted']:.2f}, renders {r['broken_on_renders']:.2f}; by region "
        + ", ".join(f"{k} {r['broken_' + k]:.2f}" for k in REGIONS)
        + f"; the realism filter's ROC AUC, sound vs broken: {r['realism_auc_sound_vs_broken']:.2f}"
    )
    print(f"generator {r['images_per_s']:.2f} images/s")
    if args.garble_grid:
        # 32 images spread over the residual order, mildest first, each with its residual in the JSON
        order = np.argsort(residual)[np.linspace(0, len(residual) - 1, min(32, len(residual))).astype(int)]
        rows = [np.concatenate(list(images[order[i : i + 8]]), 1) for i in range(0, len(order) - 7, 8)]
        side = images.shape[1] * 3  # 3x, so a reader can judge each face
        Image.fromarray(np.concatenate(rows, 0)).resize((8 * side, len(rows) * side), Image.NEAREST).save(
            args.garble_grid
        )
        r["garble_grid_residuals"] = [round(float(x), 1) for x in residual[order]]  # type: ignore[assignment]
    if args.json:
        record: dict[str, Any] = {
            "command": sys.argv,
            "checkpoint": str(Path(args.checkpoint).resolve()),
            "judges": judges(cfg, args.evaluator, args.identity_evaluator),
            # NaN (an undefined number) as null, so the file is standard JSON
            "numbers": {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()},
        }
        Path(args.json).write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    if args.grid:
        rows = [np.concatenate(list(images[i : i + 8]), 1) for i in range(0, min(32, args.n) - 7, 8)]
        Image.fromarray(np.concatenate(rows, 0)).save(args.grid)


if __name__ == "__main__":
    main()
