"""Puppet-domain data helpers shared by every model trained on puppet renders (the tiny detectors in
detectors/data.py, MAUGen's PuppetFaceDataset): split-disjoint identities, random AU targets, batch rendering.

Identities come from seeded streams: `split="train"` and `split="heldout"` never share a stream,
so held-out numbers are on people the model never saw. AU targets mix emotion prototypes (what
the factory asks for) with independent per-AU draws (so a detector cannot read one AU off its
usual partners), and intensity 1, just under the occurrence threshold, is common on purpose.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ProcessPoolExecutor
from typing import Literal

import numpy as np

from core.facs import INTENSITY_MAX, NUM_AUS
from pipelines.prompts.targets import random_requests

from .identity import AGE_GROUPS, SKIN_TONE_GROUPS, PuppetIdentity, sample_identity
from .renderer import PuppetRenderer

Split = Literal["train", "heldout", "evaluator"]
#: rng stream of each split (identities; detectors/data.py draws its sets from them too). `evaluator`
#: feeds only the evaluation panel (detectors/models/README.md): identities and renders that neither
#: MAUGen nor the build's filters were trained on, so the panel is not a judge the model learnt to please.
SPLIT_STREAM: dict[str, int] = {"train": 0x5EED_0001, "heldout": 0x5EED_0002, "evaluator": 0x5EED_0003}


def identities(n: int, split: Split, seed: int = 0) -> list[PuppetIdentity]:
    """`n` identities of a split, balanced over skin-tone and age groups."""
    rng = np.random.default_rng([SPLIT_STREAM[split], seed])
    out = []
    for i in range(n):
        skin = i % SKIN_TONE_GROUPS
        age = AGE_GROUPS[(i // SKIN_TONE_GROUPS) % len(AGE_GROUPS)]
        out.append(sample_identity(rng, skin_group=skin, age_group=age))
    return out


def au_targets(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 12) int intensities: half emotion prototypes, half independent AUs (p=0.35 each)."""
    half = n // 2
    proto = np.stack([np.asarray(r.intensity) for r in random_requests(half, seed=int(rng.integers(2**31)))])
    indep = np.where(rng.random((n - half, NUM_AUS)) < 0.35, rng.integers(1, INTENSITY_MAX + 1, (n - half, NUM_AUS)), 0)
    out = np.concatenate([proto.reshape(half, NUM_AUS), indep]).astype(np.int64)
    return out[rng.permutation(n)]


def _render_chunk(args: tuple[int, int, list[PuppetIdentity], np.ndarray]) -> np.ndarray:
    size, supersample, people, ints = args
    return PuppetRenderer(size=size, supersample=supersample).render_batch(people, ints)


def render(
    people: list[PuppetIdentity], intensity: np.ndarray, size: int = 64, supersample: int = 4, workers: int = 2
) -> np.ndarray:
    """Render (identity, intensity) rows, in `workers` processes (the renderer is pure Python + PIL)."""
    n = len(people)
    if workers <= 1 or n < 512:
        return _render_chunk((size, supersample, people, intensity))
    bounds = np.linspace(0, n, workers * 4 + 1).astype(int)
    jobs = [(size, supersample, people[a:b], intensity[a:b]) for a, b in itertools.pairwise(bounds) if b > a]
    with ProcessPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(_render_chunk, jobs)))
