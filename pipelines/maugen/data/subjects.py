"""What the subject-split datasets (DISFA, BP4D) share: fold selection and the exemplar cache."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np

from pipelines.identities.images import load_face
from pipelines.maugen.data.prompting import describe
from pipelines.prompts.budget import TokenBudget
from pipelines.maugen.data.types import FaceSample

log = logging.getLogger(__name__)


def fold_subjects(dataset: str, wanted: list[str], present: list[str], fold: int, part: str, root: Path) -> list[str]:
    """The fold's subjects that are on disk; the absent ones are logged, none at all is an error."""
    chosen = [s for s in wanted if s in present]
    missing = [s for s in wanted if s not in present]
    if missing:
        log.warning(
            "%s fold %d %s: %d subjects have no labels under %s: %s", dataset, fold, part, len(missing), root, missing
        )
    if not chosen:
        raise FileNotFoundError(f"{dataset} fold {fold} {part}: none of {wanted} has labels under {root}")
    return chosen


class ExemplarCache:
    """One exemplar image per subject (its path chosen by the dataset), loaded once."""

    def __init__(self, size: int):
        self.size = size
        self.paths: dict[str, Path] = {}
        self._images: dict[str, np.ndarray] = {}

    def __call__(self, subject: str) -> np.ndarray:
        img = self._images.get(subject)
        if img is None:
            img = self._images[subject] = load_face(self.paths[subject], self.size)
        return img


class SubjectExemplars:
    """What a subject-split dataset (DISFA, BP4D) tells about its people: `subjects` and their exemplars
    (`exemplars`, an ExemplarCache), for the identity condition and for `factory train`'s
    training-subject embeddings (factory/leakage.py)."""

    subjects: list[str]
    exemplars: ExemplarCache

    def exemplar(self, subject: str) -> np.ndarray:
        """The subject's exemplar image (cached)."""
        return self.exemplars(subject)

    def subject_exemplars(self) -> list[tuple[str, np.ndarray]]:
        """(subject id, exemplar image) of every subject with frames in the dataset, in `subjects` order."""
        return [(s, self.exemplar(s)) for s in self.subjects]


def frame_sample(
    source: str,
    path: Path,
    size: int,
    intensity: np.ndarray,
    occurrence: np.ndarray,
    prompt_vector: np.ndarray,
    exemplar: np.ndarray,
    subject: str,
    seed: int,
    budget: TokenBudget | None = None,
    **meta,
) -> FaceSample:
    """A video frame as a FaceSample: no face masks in these datasets, so the mask is the whole frame.

    The prompt's seed is a hash of (source, subject, meta), so a frame always gets the same wording.
    """
    key = "/".join([source, subject, *(str(v) for v in meta.values())])
    image = load_face(path, size)
    return FaceSample(
        image=image,
        intensity=intensity,
        occurrence=occurrence,
        mask=np.ones(image.shape[:2], dtype=np.float32),
        exemplar=exemplar.copy(),
        prompt=describe(prompt_vector, zlib.crc32(key.encode()) ^ seed, budget),
        subject=subject,
        meta={"source": source, **meta, "file": str(path)},
    )
