"""Puppet-domain training and held-out data for the tiny detectors, with disjoint identities.

Identities, AU targets and rendering are pipelines/puppet/data.py's (MAUGen's puppet dataset shares
them); this module draws the detectors' AU and realism sets from them. Training code, so it may import
pipelines (tests/test_layering.py).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np

from pipelines.puppet import PuppetIdentity, PuppetRenderer
from pipelines.puppet.data import SPLIT_STREAM, Split, au_targets, identities, render

log = logging.getLogger(__name__)


@dataclass
class PuppetSet:
    images: np.ndarray  # uint8 (N, H, W, 3)
    intensity: np.ndarray  # int (N, 12)
    identity: np.ndarray  # int (N,): index into `people`
    people: list[PuppetIdentity]


def au_set(n: int, num_people: int, split: Split, seed: int = 0, size: int = 64, workers: int = 2) -> PuppetSet:
    """`n` renders of `num_people` identities of `split` with random AU targets."""
    people = identities(num_people, split, seed)
    rng = np.random.default_rng([SPLIT_STREAM[split], seed, 1])
    who = rng.integers(0, num_people, n)
    ints = au_targets(n, rng)
    images = render([people[i] for i in who], ints, size=size, workers=workers)
    return PuppetSet(images=images, intensity=ints, identity=who, people=people)


# ---------------------------------------------------------------------------------------------
# Realism negatives: what the discriminator must reject.

NEGATIVE_KINDS: tuple[str, ...] = (
    "noise",  # i.i.d. pixel noise
    "smooth_noise",  # low-frequency random field (off-domain texture)
    "shapes",  # random ellipses and boxes on a random background (off-domain)
    "blur",  # strong blur of a real render
    "pixelate",  # block upsampling of a tiny render
    "heavy_noise",  # real render under strong additive noise
    "channel_swap",  # wrong colours: permuted or inverted channels
    "patch_shuffle",  # face cut into tiles and shuffled
    "half_face",  # one half of the face replaced by another identity's / blank
    "flip_vertical",  # upside-down face
    "blank_region",  # a large block of the face erased
    "blend",  # two faces superimposed (ghosting)
)


_SWAPS = [p for p in itertools.permutations(range(3)) if p != (0, 1, 2)]


def degrade(img: np.ndarray, other: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A negative example of `kind` made from a real render `img` (and a second one, `other`)."""
    from PIL import Image, ImageFilter

    h, w, _ = img.shape
    f = img.astype(np.float32)
    if kind == "noise":
        out = rng.integers(0, 256, img.shape)
    elif kind == "smooth_noise":
        small = rng.integers(0, 256, (4 + int(rng.integers(6)), 4 + int(rng.integers(6)), 3)).astype(np.uint8)
        out = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))
    elif kind == "shapes":
        from PIL import ImageDraw

        canvas = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(3, 9))):
            x0, y0 = rng.integers(0, w, 2)
            x1, y1 = x0 + rng.integers(4, w // 2), y0 + rng.integers(4, h // 2)
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)([int(x0), int(y0), int(x1), int(y1)], fill=fill)
        out = np.asarray(canvas)
    elif kind == "blur":
        out = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(2.5 + 2.5 * rng.random())))
    elif kind == "pixelate":
        k = int(rng.choice([6, 8, 12, 16]))
        small = Image.fromarray(img).resize((w // k, h // k), Image.BILINEAR)
        out = np.asarray(small.resize((w, h), Image.NEAREST))
    elif kind == "heavy_noise":
        out = f + rng.normal(0, 60 + 40 * rng.random(), img.shape)
    elif kind == "channel_swap":
        # inverted, or the channels in one of the five orders that are not the original
        out = 255 - f if rng.random() < 0.4 else f[..., list(_SWAPS[rng.integers(len(_SWAPS))])]
    elif kind == "patch_shuffle":
        t = int(rng.choice([2, 4]))
        ph, pw = h // t, w // t
        tiles = [img[i * ph : (i + 1) * ph, j * pw : (j + 1) * pw] for i in range(t) for j in range(t)]
        order = rng.permutation(len(tiles))
        if (order == np.arange(len(tiles))).all():
            order = order[::-1]
        rows = [np.concatenate([tiles[order[i * t + j]] for j in range(t)], axis=1) for i in range(t)]
        out = np.concatenate(rows, axis=0)
    elif kind == "half_face":
        out = f.copy()
        if rng.random() < 0.5:
            out[:, w // 2 :] = other[:, w // 2 :] if rng.random() < 0.5 else rng.integers(0, 256, 3)
        else:
            out[h // 2 :] = other[h // 2 :] if rng.random() < 0.5 else rng.integers(0, 256, 3)
    elif kind == "flip_vertical":
        out = img[::-1]
    elif kind == "blank_region":
        out = f.copy()
        bh, bw = int(h * (0.35 + 0.25 * rng.random())), int(w * (0.35 + 0.25 * rng.random()))
        y, x = int(rng.integers(h // 6, h - bh)), int(rng.integers(w // 8, w - bw))
        out[y : y + bh, x : x + bw] = rng.integers(0, 256, 3)
    elif kind == "blend":
        a = 0.35 + 0.3 * rng.random()
        out = a * f + (1 - a) * other.astype(np.float32)
    else:
        raise ValueError(f"unknown negative kind {kind!r}; allowed: {', '.join(NEGATIVE_KINDS)}")
    return np.clip(np.asarray(out, dtype=np.float32), 0, 255).round().astype(np.uint8)


def realism_set(
    n: int,
    num_people: int,
    split: Split,
    seed: int = 0,
    size: int = 64,
    workers: int = 2,
    failures: bool = False,
    fakes: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, label 1 real / 0 negative, kind index into ALL_KINDS or -1): half clean renders, half negatives.

    `failures`: half of the negatives are corrupted the way a generator fails (FAILURE_KINDS, inside the face's
    feature regions) instead of globally. `fakes`: a generator's raw outputs, added as negatives of kind
    "generated" (the paper's discriminator: real against generated).
    """
    base = au_set(n, num_people, split, seed + 100, size=size, workers=workers)
    rng = np.random.default_rng([SPLIT_STREAM[split], seed, 2])
    labels = np.ones(n, dtype=np.int64)
    kinds = np.full(n, -1, dtype=np.int64)
    images = base.images.copy()
    neg = rng.permutation(n)[: n // 2]
    renderer = PuppetRenderer(size=size) if failures else None
    for i in neg:  # draws in the order the committed `realism` was trained with (failures off)
        if renderer is not None and rng.random() < 0.5:
            k = int(rng.integers(len(FAILURE_KINDS)))
            other = base.images[int(rng.integers(n))]
            person = base.people[int(base.identity[i])]
            images[i] = degrade_region(base.images[i], other, renderer.feature_masks(person), FAILURE_KINDS[k], rng)
            kinds[i] = len(NEGATIVE_KINDS) + k
        else:
            k = int(rng.integers(len(NEGATIVE_KINDS)))
            other = base.images[int(rng.integers(n))]
            images[i] = degrade(base.images[i], other, NEGATIVE_KINDS[k], rng)
            kinds[i] = k
        labels[i] = 0
    if fakes is not None and len(fakes):
        if fakes.shape[1:] != images.shape[1:]:
            raise ValueError(f"generated faces are {fakes.shape[1:]}, the renders {images.shape[1:]}: make them at {size} px")
        images = np.concatenate([images, fakes])
        labels = np.concatenate([labels, np.zeros(len(fakes), dtype=np.int64)])
        kinds = np.concatenate([kinds, np.full(len(fakes), ALL_KINDS.index("generated"), dtype=np.int64)])
    return images, labels, kinds


# ---------------------------------------------------------------------------------------------
# Negatives shaped like a generator's failures: one feature region scrambled, smeared or misplaced,
# the rest of the face intact (what the MAUGen grids show; factory/garble.py measures it independently).

FAILURE_KINDS: tuple[str, ...] = (
    "region_scramble",  # a feature region's pixels cut into small tiles and shuffled (torn eyes, broken mouths)
    "region_smear",  # a feature region blurred and its colours smudged (a smeared mouth, melted eyes)
    "region_swap",  # a feature region from another face, shifted a few pixels (features out of place)
)
#: Every negative kind's name, by the index realism_set records (`generated`: a generator's raw output).
ALL_KINDS: tuple[str, ...] = NEGATIVE_KINDS + FAILURE_KINDS + ("generated",)
def degrade_region(
    img: np.ndarray, other: np.ndarray, regions: list[np.ndarray], kind: str, rng: np.random.Generator
) -> np.ndarray:
    """A negative of FAILURE_KINDS `kind`: one or two of `regions` of the real render `img` broken."""
    from PIL import Image, ImageFilter

    h, w, _ = img.shape
    out = img.astype(np.float32)
    hit = rng.choice(len(regions), size=1 + int(rng.random() < 0.35), replace=False)
    for r in hit:
        m = regions[int(r)]
        if not m.any():
            continue
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        if kind == "region_scramble":  # tiles moved within the region's own box
            t = int(rng.choice([2, 3, 4]))
            src = out.copy()
            for y in range(y0, y1, t):
                for x in range(x0, x1, t):
                    dy, dx = rng.integers(-t, t + 1, 2)
                    hh, ww = min(t, y1 - y), min(t, x1 - x)
                    sy, sx = int(np.clip(y + dy, y0, y1 - hh)), int(np.clip(x + dx, x0, x1 - ww))
                    out[y : y + hh, x : x + ww] = src[sy : sy + hh, sx : sx + ww]
            out = np.where(m[..., None], out, img)
        elif kind == "region_smear":
            blurred = np.asarray(
                Image.fromarray(img).filter(ImageFilter.GaussianBlur(1.0 + 1.5 * rng.random())), dtype=np.float32
            )
            out = np.where(m[..., None], blurred + rng.normal(0, 8, 3), out)
        elif kind == "region_swap":  # another face's features, its skin tone matched, a few pixels off
            dy, dx = rng.integers(-3, 4, 2)
            moved = np.roll(other.astype(np.float32), (int(dy), int(dx)), axis=(0, 1))
            moved += img[m].astype(np.float32).mean(0) - moved[m].mean(0)
            out = np.where(m[..., None], moved, out)
        else:
            raise ValueError(f"unknown failure kind {kind!r}; allowed: {', '.join(FAILURE_KINDS)}")
    return np.clip(out, 0, 255).round().astype(np.uint8)
