"""Puppet faces as MAUGen training data: exact AU labels, exact face masks, unlimited identities.

The puppet renderer is the project's test domain: every label is the intensity the face was drawn
with, so a model trained here can be checked against ground truth, which DISFA/BP4D cannot offer.
Everything is rendered once at construction (a few ms per face, in worker processes for large
sets), so `__getitem__` is an array lookup and the dataset is a pure function of its arguments.

Memory: images are uint8 (n, H, W, 3); exemplars (the neutral render) and face masks are stored
once per person, not per sample.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
from torch.utils.data import Dataset

from core.facs import DEFAULT_OCCURRENCE_THRESHOLD, NUM_AUS
from pipelines.maugen.data.prompting import describe
from pipelines.prompts.budget import TokenBudget
from pipelines.maugen.data.types import FaceSample
from pipelines.puppet import PuppetIdentity, PuppetRenderer
from pipelines.puppet.data import au_targets, identities, render

log = logging.getLogger(__name__)

_STREAM = 0x4D41_5547  # "MAUG": keeps this dataset's draws apart from pipelines.puppet.data's streams


def person_id(identity: PuppetIdentity) -> str:
    """A stable subject id from the identity's parameters (same person -> same id in any dataset)."""
    return "puppet-" + hashlib.sha1(identity.model_dump_json().encode()).hexdigest()[:12]


def _people(people: Sequence[PuppetIdentity] | int, split: str, seed: int) -> list[PuppetIdentity]:
    """The dataset's identities: the list given, or `people` drawn from the split's stream."""
    if isinstance(people, (int, np.integer)):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if people < 1:
            raise ValueError(f"people must be >= 1, got {people}")
        people = identities(int(people), split, seed)
    people = list(people)
    if not people:
        raise ValueError("people is an empty list; give identities or a count")
    if not all(isinstance(p, PuppetIdentity) for p in people):
        raise ValueError("people must be PuppetIdentity objects (pipelines.puppet.sample_identity) or an int")
    return people


def _draw_people(n: int, people: int, seed: int) -> tuple[np.random.Generator, np.ndarray]:
    """The dataset's rng and, drawn first from it, the index of each of its `n` samples' person."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    rng = np.random.default_rng([_STREAM, int(seed)])
    return rng, rng.integers(0, people, int(n))


def puppet_subjects(
    n: int,
    people: Sequence[PuppetIdentity] | int,
    split: Literal["train", "heldout"] = "train",
    seed: int = 0,
    size: int = 64,
    workers: int = 2,
) -> list[tuple[str, np.ndarray]]:
    """(subject id, exemplar) of every person that `PuppetFaceDataset(n, people, split, seed, size)` draws,
    in the order of `people`, without rendering the samples: what its `subject_exemplars()` returns."""
    people = _people(people, split, seed)
    PuppetRenderer(size=int(size))  # validates size
    drawn = [people[i] for i in np.unique(_draw_people(n, len(people), seed)[1])]
    exemplars = render(drawn, np.zeros((len(drawn), NUM_AUS)), size=int(size), workers=workers)
    return [(person_id(p), e) for p, e in zip(drawn, exemplars)]


def feature_weights(renderer: PuppetRenderer, person: PuppetIdentity) -> np.ndarray:
    """Float32 (H, W): the mean over the person's features of each feature's mask divided by its share of the
    face, so the map averages about 1 over the face and the eyes weigh as much as the larger mouth."""
    face = renderer.face_mask(person)
    maps = [m / max(float(m[face].mean()), 1e-6) for m in renderer.feature_masks(person)]
    return (np.mean(maps, axis=0) * face).astype(np.float32)


class PuppetFaceDataset(Dataset):
    """`n` puppet renders of `people` with random AU targets (pipelines.puppet.data.au_targets).

    `people` is a list of identities, or a count drawn from `pipelines.puppet.data.identities(count, split,
    seed)` (train and heldout never share a person). Each sample picks a person and a target with an
    rng seeded by `seed`; labels are exact: intensity = the rendered target, occurrence = intensity
    >= 2. The exemplar is the person's neutral render (all AUs 0), the mask their face mask.
    """

    def __init__(
        self,
        n: int,
        people: Sequence[PuppetIdentity] | int,
        split: Literal["train", "heldout"] = "train",
        seed: int = 0,
        size: int = 64,
        workers: int = 2,
        budget: TokenBudget | None = None,
    ):
        people = _people(people, split, seed)
        self.people: list[PuppetIdentity] = people
        self.size, self.seed = int(size), int(seed)
        renderer = PuppetRenderer(size=self.size)  # validates size before any work

        rng, person = _draw_people(n, len(people), self.seed)
        #: int64 (n,): index into `people` of each sample.
        self.person: np.ndarray = person
        #: int64 (n, 12): the exact AU intensities each image was rendered with.
        self.targets: np.ndarray = au_targets(int(n), rng)
        prompt_seeds = rng.integers(0, 2**62, int(n))

        self.images: np.ndarray = render(
            [people[i] for i in self.person], self.targets, size=self.size, workers=workers
        )
        self.exemplars: np.ndarray = render(people, np.zeros((len(people), NUM_AUS)), size=self.size, workers=workers)
        self.masks: np.ndarray = np.stack([renderer.face_mask(p) for p in people]).astype(np.uint8)
        #: float32 (people, H, W): each person's feature weight map (FaceSample.features)
        self.features: np.ndarray = np.stack([feature_weights(renderer, p) for p in people])
        self.subject_ids: list[str] = [person_id(p) for p in people]
        self.prompts: list[str] = [describe(t, int(s), budget) for t, s in zip(self.targets, prompt_seeds)]
        log.info("puppet dataset: %d renders of %d people at %d px (seed %d)", n, len(people), self.size, seed)

    def __len__(self) -> int:
        return len(self.images)

    def subject_exemplars(self) -> list[tuple[str, np.ndarray]]:
        """(subject id, exemplar) of every person the samples show, in the order of `people`."""
        return [(self.subject_ids[k], self.exemplars[k]) for k in np.unique(self.person).tolist()]

    def __getitem__(self, i: int) -> FaceSample:
        who = int(self.person[i])
        intensity = self.targets[i].astype(np.float32)
        return FaceSample(
            image=self.images[i].copy(),
            intensity=intensity,
            occurrence=(intensity >= DEFAULT_OCCURRENCE_THRESHOLD).astype(np.float32),
            mask=self.masks[who].astype(np.float32),
            features=self.features[who],
            exemplar=self.exemplars[who].copy(),
            prompt=self.prompts[i],
            subject=self.subject_ids[who],
            meta={"source": "puppet", "person": who, "index": int(i), "seed": self.seed},
        )
