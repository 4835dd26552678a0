"""The real domain of the realism discriminator: a pool of real face photos against a build's outputs.

`factory detectors train realism --real DIR --fake OUT` (factory/cli.py) reads both here and hands
them, split, to `detectors.train.train_realism` (the same network, fit, calibration, ONNX export and
spec as the puppet-domain realism models):

- real: the photos of DIR, an identity pool read as `identities.pool` reads it
  (pipelines/identities/pool.py: a folder, a parquet or webdataset shards, local or s3://), each
  centre-cropped and resized to the model's input size; one that does not decode is skipped and
  counted;
- fakes: every image of OUT, a factory build output (local or s3://): the samples of its committed
  shards and the candidates kept in its rejected/ tars. A build made with `--set detect.realism=null`
  filters with no realism model, so its samples are the generator's raw outputs as far as realism
  goes (its other checks still apply; its rejected/ tars hold some of what they refused).

The model's input size is the build's image size (its first image's). Each side is read up to a cap
(the recipe's `train_samples`), evenly spread over the pool and in shard order over the build, and
split by a seeded permutation: a `holdout` share is held out; of the held-out photos, half set the
threshold and the rest measure the accepted share, and held-out outputs measure the rejected share.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image

from detectors.train import RealDomain
from pipelines.identities.images import decode_face
from pipelines.identities.pool import ExemplarPool, PoolError

from .manifest import open_build
from .record import BuildRecordError
from .report_samples import _samples

log = logging.getLogger(__name__)


class RealismDataError(ValueError):
    """Bad --real or --fake input: one line naming the thing and the fix."""


def _spread(n: int, cap: int) -> np.ndarray:
    """Up to `cap` indices evenly spread over range(n)."""
    return np.arange(n) if n <= cap else np.unique(np.linspace(0, n - 1, cap).round().astype(int))


def build_images(out: str, cap: int) -> tuple[np.ndarray, dict[str, int]]:
    """uint8 (N, S, S, 3): up to `cap` images of build OUT (committed shards, then their rejected/ tars,
    in shard order) at the build's own size S; and how many came from each."""
    try:
        b = open_build(out)
    except (FileNotFoundError, BuildRecordError) as err:
        raise RealismDataError(f"--fake {out}: {str(err).splitlines()[0]}") from None
    names = sorted(b.state.committed)
    images: list[np.ndarray] = []
    counts = {"accepted": 0, "rejected": 0}
    size: int | None = None
    paths = [("accepted", b.layout.tar(n)) for n in names]
    kept = [n for n in names if (b.state.committed[n].get("files") or {}).get("rejected")]
    paths += [("rejected", b.layout.rejected_tar(n)) for n in kept]
    for which, path in paths:
        for s in _samples(b.layout, path, which):
            if len(images) >= cap:
                break
            if "image" not in s:  # a rejected candidate that was never generated
                continue
            if size is None:  # the build's size: every image of a build has it
                with Image.open(io.BytesIO(s["image"])) as im:
                    size = im.size[0]
            try:
                images.append(decode_face(s["image"], size, f"{path}: {s['key']}"))
            except ValueError as err:
                log.warning("--fake: skipping %s", str(err).splitlines()[0])
                continue
            counts[which] += 1
        if len(images) >= cap:
            break
    if not images:
        raise RealismDataError(
            f"--fake {out}: the build has no sample images (committed shards: {len(names)}); finish or resume it "
            f"(`factory resume {out}`), or give a build with samples"
        )
    return np.stack(images), counts


def pool_images(uri: str, size: int, cap: int) -> tuple[np.ndarray, dict[str, int]]:
    """uint8 (N, size, size, 3): up to `cap` photos of the pool at `uri`, evenly spread over it; and how
    many were read and skipped (not decodable)."""
    try:
        pool = ExemplarPool(uri)
    except PoolError as err:
        raise RealismDataError(f"--real {uri}: {str(err).splitlines()[0]}") from None
    images, skipped = [], []
    for i in _spread(len(pool), cap):
        try:
            images.append(pool.read(int(i), size)[0])
        except (ValueError, OSError) as err:
            skipped.append(pool.entries[int(i)].name)
            log.warning("--real: skipping %s", str(err).splitlines()[0])
    if not images:
        raise RealismDataError(
            f"--real {uri}: none of its {len(pool)} photos can be read (first: {skipped[0]}); give readable face photos"
        )
    return np.stack(images), {"photos": len(images), "skipped": len(skipped)}


def _split(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) indices of range(n) by a seeded permutation; round(n * holdout) held out."""
    perm = np.random.default_rng([seed, n, 20]).permutation(n)
    k = round(n * holdout)
    return perm[k:], perm[:k]


def real_domain(real: str, fake: str, holdout: float, cap: int, seed: int) -> tuple[RealDomain, int]:
    """The photos of pool `real` against the images of build `fake`, split for train_realism; and the
    model's input size (the build's image size)."""
    fakes, fake_counts = build_images(fake, cap)
    size = int(fakes.shape[1])
    photos, real_counts = pool_images(real, size, cap)
    r_train, r_held = _split(len(photos), holdout, seed)
    f_train, f_held = _split(len(fakes), holdout, seed + 1)
    if len(r_held) < 2 or len(r_train) < 1:
        raise RealismDataError(
            f"--real {real}: {len(photos)} readable photos are too few to hold out {holdout:g} of them for the "
            "threshold and the eval (at least 2 held out and 1 to train on); add photos or change --holdout"
        )
    if len(f_held) < 1 or len(f_train) < 1:
        raise RealismDataError(
            f"--fake {fake}: {len(fakes)} sample images are too few to hold out {holdout:g} of them for the eval "
            "(at least 1 held out and 1 to train on); give a larger build or change --holdout"
        )
    cal, ev = r_held[: (len(r_held) + 1) // 2], r_held[(len(r_held) + 1) // 2 :]
    domain = RealDomain(
        real=photos[r_train],
        fakes=fakes[f_train],
        calibration=photos[cal],
        heldout_real=photos[ev],
        heldout_fakes=fakes[f_held],
        source={
            "real": real,
            "fake": fake,
            "holdout": holdout,
            "calibration_photos": len(cal),
            "real_read": real_counts,
            "fakes_read": fake_counts,
        },
    )
    return domain, size
