"""The baseline an identity-leakage figure needs: how close to MAUGen's training subjects are faces that
cannot have leaked?

A build records, per sample, the highest cosine between the generated face and the training subjects
(`training_similarity`). On its own that number says little: an encoder finds any two faces of a
domain somewhat alike. This bench scores each sample's own exemplar (an identity MAUGen never trained
on) against the same subjects with the same encoder, so the two distributions can be compared, and
counts the generated faces that are closer to a training subject than to their own exemplar. It also
recomputes the build's recorded `training_similarity` and stops if it differs.

Run: python bench/bench_leakage_baseline.py OUT      (a local build made with generator=maugen)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detectors.builtin import resolve
from detectors.identity import OnnxIdentityEncoder, cosine, max_similarity
from factory.eval import _read_shard, _References
from factory.identities import identity_from_json
from factory.leakage import TrainingSubjects
from factory.manifest import open_build
from factory.record import BuildRecordError
from pipelines.maugen.builtin import SUBJECTS_FILE, resolve_checkpoint

log = logging.getLogger("bench")


def _summary(x: np.ndarray, threshold: float) -> str:
    q = np.quantile(x, [0.5, 0.9, 0.99])
    above = int((x > threshold).sum())
    return (
        f"p50 {q[0]:.3f}, p90 {q[1]:.3f}, p99 {q[2]:.3f}, max {x.max():.3f}; "
        f"{above} of {len(x)} ({above / len(x):.1%}) above {threshold}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="a local build's OUT (generator=maugen)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        b = open_build(args.out)
    except (FileNotFoundError, BuildRecordError) as err:
        sys.exit(str(err).splitlines()[0])
    cfg = b.cfg
    if cfg.generator != "maugen":
        sys.exit(f"{args.out}: generator={cfg.generator} has no training subjects; run this on a MAUGen build")
    subjects = TrainingSubjects.load(
        resolve_checkpoint(cfg.maugen.checkpoint) / SUBJECTS_FILE,
        f"run `factory subjects {cfg.maugen.checkpoint}`",
    )
    enc = OnnxIdentityEncoder(str(resolve(cfg.detect.identity_encoder)))
    threshold = enc.verify_threshold
    refs = _References(cfg)
    generated, exemplars, own = [], [], []
    for name in sorted(b.state.committed):
        _, images, table = _read_shard(b.layout, name)
        people = [identity_from_json(s) for s in table.column("identity").to_pylist()]
        eg, ee = enc.embed(images), enc.embed(refs.exemplars(people, images.shape[1]))
        generated.append(max_similarity(eg, subjects.embeddings))
        exemplars.append(max_similarity(ee, subjects.embeddings))
        own.append(cosine(eg, ee))
        recorded = np.array(table.column("training_similarity").to_pylist(), dtype=np.float64)
        if not np.allclose(recorded, generated[-1], atol=1e-4):
            sys.exit(f"shard {name}: the recorded training_similarity differs from its recomputation")
    g, e, o = (np.concatenate(x) for x in (generated, exemplars, own))
    log.info("%s: %d samples, encoder %s, %d training subjects", args.out, len(g), cfg.detect.identity_encoder,
             len(subjects.embeddings))  # fmt: skip
    log.info("generated faces vs training subjects:           %s", _summary(g, threshold))
    log.info("their own exemplars vs training subjects:       %s", _summary(e, threshold))
    log.info(
        "generated vs own exemplar: p50 %.3f; closer to a training subject than to their own exemplar: %d of %d",
        np.quantile(o, 0.5), int((g > o).sum()), len(g),
    )  # fmt: skip


if __name__ == "__main__":
    main()
