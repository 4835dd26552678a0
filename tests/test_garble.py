"""factory/garble.py: the broken-face measure calls intact renders intact and scrambled features broken."""

from __future__ import annotations

import numpy as np

from factory.garble import BROKEN_RESIDUAL, REGIONS, GarbleMeter
from pipelines.prompts.targets import random_requests
from pipelines.puppet import PuppetRenderer
from pipelines.puppet.data import identities


def _scramble(image: np.ndarray, box: np.ndarray, rng: np.random.Generator, tile: int = 2) -> np.ndarray:
    """Shuffle the tiles of the bounding box of `box` (a bool mask): eyes or a mouth torn apart."""
    out = image.copy()
    ys, xs = np.nonzero(box)
    y0, x0 = ys.min(), xs.min()
    h, w = (ys.max() + 1 - y0) // tile * tile, (xs.max() + 1 - x0) // tile * tile
    patch = out[y0 : y0 + h, x0 : x0 + w]
    tiles = patch.reshape(h // tile, tile, w // tile, tile, 3).transpose(0, 2, 1, 3, 4).reshape(-1, tile, tile, 3)
    tiles = tiles[rng.permutation(len(tiles))]
    out[y0 : y0 + h, x0 : x0 + w] = tiles.reshape(h // tile, w // tile, tile, tile, 3).transpose(0, 2, 1, 3, 4).reshape(h, w, 3)
    return out


def test_renders_are_intact_and_scrambled_eyes_or_mouths_are_broken():
    n = 48
    people = identities(n, "heldout", seed=31)
    renderer = PuppetRenderer(size=64)
    targets = np.array([r.intensity for r in random_requests(n, seed=33)])
    renders = renderer.render_batch(people, targets)
    meter = GarbleMeter()
    # explained by the evaluator's reading alone, few intact faces look broken (its misreadings)
    read_only = meter(renders, people)
    assert read_only.residual.shape == (n, len(REGIONS))
    assert read_only.broken.mean() <= 0.05, np.sort(read_only.residual.max(axis=1))
    # with the targets among the explanations, none does
    assert not meter(renders, people, [targets]).broken.any()
    rng = np.random.default_rng(0)
    scrambled = renders.copy()
    for b, p in enumerate(people):
        aus = REGIONS["eyes"] if b % 2 else REGIONS["mouth"]
        box = np.zeros((64, 64), dtype=bool)
        for au in aus:
            box |= renderer.region_mask(p, au)
        scrambled[b] = _scramble(renders[b], box, rng)
    torn = meter(scrambled, people, [targets])
    # eval passes the reading its own panel made (the same evaluator, run once): the same scores
    read = meter.panel.detect(scrambled).consensus.intensity
    np.testing.assert_array_equal(meter(scrambled, people, [targets], read).residual, torn.residual)
    assert torn.broken.mean() >= 0.8, np.sort(torn.residual.max(axis=1))
    summary = torn.summary()
    assert summary["threshold"] == BROKEN_RESIDUAL and summary["by_region"]["mouth"] > 0
