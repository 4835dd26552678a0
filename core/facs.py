"""The AU schema: the 12 DISFA Action Units, their intensity scale and the emotion prototypes.

Defined once here and imported everywhere (factory, pipelines, detectors), so the order of
the 12-vector that every sample carries can never drift between stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The 12 DISFA AUs, in the order of every label vector the product writes.
AUS: tuple[int, ...] = (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26)
NUM_AUS: int = len(AUS)

#: FACS names, indexed like AUS.
AU_NAMES: dict[int, str] = {
    1: "inner brow raiser",
    2: "outer brow raiser",
    4: "brow lowerer",
    5: "upper lid raiser",
    6: "cheek raiser",
    9: "nose wrinkler",
    12: "lip corner puller",
    15: "lip corner depressor",
    17: "chin raiser",
    20: "lip stretcher",
    25: "lips part",
    26: "jaw drop",
}

#: Plain-language descriptions (used for language initialisation of the AU queries).
AU_DESCRIPTIONS: dict[int, str] = {
    1: "inner ends of the brows go up",
    2: "outer ends of the brows go up",
    4: "brows down and drawn together",
    5: "eyes open wider, upper lid up",
    6: "cheeks lift, crow's feet, lower lid pushed up",
    9: "nose wrinkles, upper lip lifts",
    12: "lip corners pulled up and out",
    15: "lip corners pulled down",
    17: "chin boss pushed up, lower lip raised",
    20: "lips stretched sideways",
    25: "lips apart",
    26: "jaw lowered, mouth open",
}

#: Intensity scale: 0 absent, then FACS A..E = 1..5.
INTENSITY_MIN: int = 0
INTENSITY_MAX: int = 5
INTENSITY_LETTERS: dict[int, str] = {0: "-", 1: "A", 2: "B", 3: "C", 4: "D", 5: "E"}

#: DISFA protocol: an AU occurs when its intensity is at least this.
DEFAULT_OCCURRENCE_THRESHOLD: int = 2


def au_index(au: int) -> int:
    """Position of AU number `au` in the 12-vector; a clear error for AUs outside DISFA's 12."""
    try:
        return AUS.index(au)
    except ValueError:
        raise ValueError(f"AU{au} is not one of the 12 DISFA AUs {list(AUS)}") from None


def occurrence(intensity: np.ndarray, threshold: int = DEFAULT_OCCURRENCE_THRESHOLD) -> np.ndarray:
    """Occurrence labels (bool) from intensities on the 0-5 scale, last axis = the 12 AUs."""
    intensity = np.asarray(intensity)
    if intensity.shape[-1] != NUM_AUS:
        raise ValueError(f"AU vector must have {NUM_AUS} entries (AUs {list(AUS)}), got shape {intensity.shape}")
    return intensity >= threshold


def active_set(intensity: np.ndarray, threshold: int = DEFAULT_OCCURRENCE_THRESHOLD) -> frozenset[int]:
    """The AU numbers that occur in one 12-vector."""
    occ = occurrence(intensity, threshold)
    return frozenset(au for au, on in zip(AUS, occ.tolist()) if on)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard |A and B| / |A or B| of two boolean 12-vectors; both empty counts as 1 (docs/facs.md)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


@dataclass(frozen=True)
class EmotionPrototype:
    """An EMFACS-style prototype: AUs that define the emotion and AUs that often join it."""

    name: str
    core: tuple[int, ...]
    optional: tuple[int, ...] = ()
    #: True where DISFA's 12 AUs cannot express the prototype fully (reports say so).
    partial: bool = False
    note: str = ""


EMOTIONS: dict[str, EmotionPrototype] = {
    p.name: p
    for p in (
        EmotionPrototype("neutral", ()),
        EmotionPrototype("happiness", (6, 12), (25,)),
        EmotionPrototype("sadness", (1, 4, 15), (17,)),
        EmotionPrototype("surprise", (1, 2, 5, 26), (25,)),
        EmotionPrototype("fear", (1, 2, 4, 5, 20, 26), (25,)),
        EmotionPrototype("anger", (4, 5), (17,), partial=True, note="AU7, AU23, AU24 are not among DISFA's 12"),
        EmotionPrototype("disgust", (9,), (15, 17), partial=True, note="AU10, AU16 are not among DISFA's 12"),
        EmotionPrototype(
            "contempt", (12,), (), partial=True, note="unilateral AU12+AU14; AU14 absent, approximated by weak AU12"
        ),
    )
}
EMOTION_NAMES: tuple[str, ...] = tuple(EMOTIONS)

#: Emotion strength levels, 1..4, each with the intensity range its core AUs are drawn from.
STRENGTHS: dict[int, tuple[str, tuple[int, int]]] = {
    1: ("slight", (2, 2)),
    2: ("moderate", (2, 3)),
    3: ("marked", (3, 4)),
    4: ("extreme", (4, 5)),
}
