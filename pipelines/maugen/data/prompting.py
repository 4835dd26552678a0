"""Text prompts for dataset AU vectors (DISFA, BP4D, puppet) through the factory's FACS grammar.

Real datasets come with AU labels but no emotion and no description, while MAUGen is trained on
(prompt, image) pairs like the ones the factory generates. So each label vector gets the emotion
whose prototype fits its active AUs best and a strength from how strong those AUs are, and the
grammar (`pipelines.prompts.grammar_expand`) writes the text: the same expander the factory uses,
so training prompts and generation prompts speak one language.

Uncoded AUs (NaN) are described as absent by default (the grammar needs a 0..5 value); to keep the
text from *claiming* an uncoded AU is absent ("no jaw drop" about an AU BP4D never codes), `describe`
re-draws the wording with derived seeds until the description does not mention any uncoded AU.
"""

from __future__ import annotations

import logging

import numpy as np

from core.facs import AUS, DEFAULT_OCCURRENCE_THRESHOLD, EMOTIONS, INTENSITY_MAX, INTENSITY_MIN, NUM_AUS, STRENGTHS
from pipelines.prompts import ExpansionRequest, parse_details
from pipelines.prompts.budget import TokenBudget
from pipelines.prompts.grammar import fit_description

log = logging.getLogger(__name__)

#: How many wordings `describe` tries before accepting one that mentions an uncoded AU.
MAX_REWORDINGS = 32
_SEED_STEP = 0x9E3779B97F4A7C15  # odd 64-bit constant: derived seeds never collide with the caller's
_SEED_MOD = 2**63


def prompt_levels(intensity: np.ndarray) -> np.ndarray:
    """int64 (12,) 0..5: NaN -> 0, rounded half up, clipped (what the grammar accepts)."""
    v = np.asarray(intensity, dtype=np.float64)
    if v.shape != (NUM_AUS,):
        raise ValueError(f"AU vector must have {NUM_AUS} entries (AUs {list(AUS)}), got shape {v.shape}")
    v = np.nan_to_num(v, nan=0.0, posinf=INTENSITY_MAX, neginf=INTENSITY_MIN)
    return np.clip(np.floor(v + 0.5), INTENSITY_MIN, INTENSITY_MAX).astype(np.int64)


def choose_emotion(active: frozenset[int] | set[int]) -> str:
    """The emotion whose prototype has the highest Jaccard with the active AU set.

    A prototype's AU set is its core AUs plus those of its optional AUs that are active: an optional
    AU ("happiness 6+12(+25)") helps when present and costs nothing when absent. Ties go to the
    earlier emotion of `core.facs.EMOTIONS`; an empty set is "neutral".
    """
    active = frozenset(active)
    if not active:
        return "neutral"
    best, best_score = "neutral", 0.0
    for name, proto in EMOTIONS.items():
        if name == "neutral":
            continue
        protoset = set(proto.core) | (set(proto.optional) & active)
        score = len(active & protoset) / len(active | protoset)
        if score > best_score:
            best, best_score = name, score
    return best


def choose_strength(levels: np.ndarray) -> int:
    """Strength 1..4 (facs.STRENGTHS) whose intensity range has its midpoint nearest the mean level.

    Ties go to the stronger level, so a mean of 3 ("C marked" in FACS letters) is "marked".
    """
    levels = np.asarray(levels, dtype=np.float64)
    if levels.size == 0:
        raise ValueError("choose_strength needs at least one active AU level")
    mean = float(levels.mean())
    return min(STRENGTHS, key=lambda k: (abs(mean - sum(STRENGTHS[k][1]) / 2.0), -k))


def request_for(intensity: np.ndarray, seed: int) -> ExpansionRequest:
    """The grammar request describing `intensity` (12, may hold NaN) with wording seed `seed`."""
    v = prompt_levels(intensity)
    on = v >= DEFAULT_OCCURRENCE_THRESHOLD
    active = frozenset(au for au, a in zip(AUS, on.tolist()) if a)
    emotion = choose_emotion(active)
    strength = 0 if emotion == "neutral" else choose_strength(v[on])
    return ExpansionRequest(emotion=emotion, strength=strength, intensity=v, seed=int(seed))


def describe(intensity: np.ndarray, seed: int, budget: TokenBudget | None = None) -> str:
    """A text prompt for one AU vector (12, AUS order, 0-5, NaN = not coded); deterministic for `seed`.

    With `budget` (the trained model's text encoder), the grammar shortens the wording as a build's
    expander does, so the model trains on prompts it reads to the end and that speak like the build's.
    """
    intensity = np.asarray(intensity, dtype=np.float64)
    req = request_for(intensity, seed)

    def grammar_expand(r: ExpansionRequest) -> str:
        return fit_description(r, budget)[0]

    first = grammar_expand(req)
    uncoded = np.isnan(intensity)
    if not uncoded.any():
        return first
    text = first
    for k in range(MAX_REWORDINGS + 1):
        if k:
            text = grammar_expand(req.model_copy(update={"seed": (int(seed) + k * _SEED_STEP) % _SEED_MOD}))
        if not parse_details(text).mentioned[uncoded].any():
            return text
    log.debug("describe: every wording of %s mentions an uncoded AU; keeping the seed's own", req.intensity)
    return first
