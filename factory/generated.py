"""A MAUGen's raw outputs, sampled as a build samples them: the negatives of the paper's realism discriminator.

`factory detectors train realism-gen` trains renders against these (detectors/train.py). They come from
the build's own generate stage (`MAUGenGenerator`, the `maugen` section's defaults: scheduler, steps,
guidance), every candidate, before any check: what the realism filter will be shown in a build.
Identities are the puppet split the realism set's renders use (train for training, heldout for its
eval), drawn with their own seed; prompts are the training-prompt writer's, within the model's budget.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipelines.puppet.data import Split, au_targets, identities

from .config import load_config
from .generators import GenerationBatch, MAUGenGenerator, prompt_budget

log = logging.getLogger(__name__)

#: Added to the recipe's seed for the identities and targets of the generated set.
GENERATED_SEED = 300


def generated_faces(
    checkpoint: str,
    n: int,
    num_people: int,
    split: Split,
    seed: int,
    threads: int = 0,
    batch: int = 16,
    cache: str | Path | None = None,
) -> np.ndarray:
    """uint8 (n, S, S, 3): `checkpoint`'s raw outputs for `n` random targets of `num_people` identities.

    With `cache`, each batch is kept there as it is made (under a name of the checkpoint's hash and the
    draw), so an interrupted run resumes where it stopped: sampling 2,000 faces takes CPU-hours."""
    import torch

    from pipelines.maugen.data.prompting import describe
    from pipelines.puppet import PuppetRenderer

    if threads:
        torch.set_num_threads(threads)
    cfg = load_config(None, ["generator=maugen", f"maugen.checkpoint={checkpoint}"])
    gen = MAUGenGenerator(cfg)
    budget = prompt_budget(cfg)
    people = identities(num_people, split, seed + GENERATED_SEED)
    rng = np.random.default_rng([seed + GENERATED_SEED, n, num_people])
    who = rng.integers(0, num_people, n)
    targets = au_targets(n, rng)
    seeds = rng.integers(0, 2**62, n)
    renderer = PuppetRenderer(size=gen.image_size)
    folder = None
    if cache is not None:
        folder = Path(cache) / f"{gen.version}-{split}-{seed + GENERATED_SEED}-{num_people}-{n}-{batch}"
        folder.mkdir(parents=True, exist_ok=True)
    out = []
    for a in range(0, n, batch):
        sl = slice(a, min(n, a + batch))
        done = None if folder is None else folder / f"{a:07d}.npy"
        if done is not None and done.is_file():
            out.append(np.load(done))
            continue
        persons = [people[i] for i in who[sl]]
        ex, masks = renderer.exemplars(persons)
        result = gen.generate(
            GenerationBatch(
                keys=[f"g{i}" for i in range(sl.start, sl.stop)],
                seeds=seeds[sl],
                prompts=[describe(t, int(s), budget) for t, s in zip(targets[sl], seeds[sl])],
                target=targets[sl].astype(np.int8),
                identities=persons,
                exemplars=ex,
                masks=masks,
            )
        )
        finite = np.isfinite(result.intensity).all(1)  # a NaN sample comes back marked; it is no face to learn
        out.append(result.images[finite])
        if done is not None:
            tmp = done.with_suffix(".tmp.npy")
            np.save(tmp, out[-1])
            tmp.replace(done)  # whole or absent
        if (a // batch) % 10 == 0:
            log.info("generated %d/%d raw outputs of %s (%s identities)", sl.stop, n, checkpoint, split)
    images = np.concatenate(out)
    return images
