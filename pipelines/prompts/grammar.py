"""The offline FACS grammar: turns a target (emotion, strength, 12 AU intensities) into a description.

It is the default expander and the fallback of the LLM expander, so it must always describe the
target exactly: every active AU (intensity >= facs.DEFAULT_OCCURRENCE_THRESHOLD) is named with an
intensity word of its level (lexicon.py), trace AUs (intensity 1) are either left out or named as
"barely ...", and a random few absent AUs are stated as absent. Wording, order and sentence frame
vary with the request's seed (a private random.Random, never the global one), so that the text
encoder sees varied language for one label vector, and the same request always gives the same text.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

from core.facs import AUS, DEFAULT_OCCURRENCE_THRESHOLD, au_index, jaccard, occurrence
from pipelines.prompts.lexicon import (
    AU_NEGATIVE,
    AU_POSITIVE,
    BROWS_AT_REST,
    BROWS_RAISED,
    EMOTION_FLAVOURS,
    EMOTION_NOUNS,
    LEVEL_ADJECTIVES,
    LEVEL_ADVERBS,
    STRENGTH_WORDS,
)
from pipelines.prompts.parser import parse_description
from pipelines.prompts.types import Expansion, ExpandStats, ExpansionRequest

log = logging.getLogger(__name__)

_I1, _I2, _I4 = au_index(1), au_index(2), au_index(4)

#: Chance that a trace AU (intensity 1) is named ("barely ..."); otherwise it is left out.
TRACE_MENTION_RATE = 0.5
#: Chance that an absent AU is stated as absent, and the most negatives one description carries.
NEGATIVE_RATE = 0.25
MAX_NEGATIVES = 3

_OPENERS: tuple[str, ...] = (
    "the face shows {e}",
    "the look reveals {e}",
    "a look of {e}",
    "an expression of {e}",
    "{e} shows on the face",
    "the expression conveys {e}",
    "a face marked by {e}",
    "this face displays {e}",
    "the face is filled with {e}",
    "a portrait of {e}",
    "a close view of a face in {e}",
    "the features express {e}",
)

_NEUTRAL_OPENERS: tuple[str, ...] = (
    "a neutral face",
    "a neutral expression",
    "the face is in a state of {e}",
    "a face in quiet {e}",
    "an expression of {e}",
    "the look is one of {e}",
)

_EMPTY_ENDINGS: tuple[str, ...] = (
    "{O}.",
    "{O}, with all facial muscles at rest.",
    "{O}; the features stay relaxed.",
    "{O}, nothing moves in the features.",
)


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _render(rng: random.Random, template: str, level: int) -> str:
    """Fill one phrase template with an intensity word of `level` (and maybe an article)."""
    countable = template.startswith("~")
    text = template.lstrip("~")
    if "{a}" in text:
        text = text.replace("{a}", rng.choice(LEVEL_ADJECTIVES[level]))
    if "{d}" in text:
        adverb = rng.choice(LEVEL_ADVERBS[level])
        # "jaw lowered fully" as well as "jaw fully lowered": the adverb may trail the participle.
        if not text.startswith("{d}") and " " not in adverb and level >= 2 and rng.random() < 0.3:
            text = text.replace(" {d}", "") + " " + adverb
        else:
            text = text.replace("{d}", adverb)
    if countable and not text.startswith("a little") and rng.random() < 0.5:
        text = _article(text)
    return text


def _emotion_phrase(rng: random.Random, req: ExpansionRequest) -> str:
    noun = rng.choice(EMOTION_NOUNS[req.emotion])
    if req.emotion == "neutral":
        return noun
    words = [rng.choice(STRENGTH_WORDS[req.strength])]
    flavours = EMOTION_FLAVOURS[req.emotion]
    if flavours and rng.random() < 0.3:
        words.append(rng.choice(flavours))
    words.append(noun)
    return " ".join(w for w in words if w)


def _opener(rng: random.Random, req: ExpansionRequest) -> str:
    openers = _NEUTRAL_OPENERS if req.emotion == "neutral" else _OPENERS
    return rng.choice(openers).format(e=_emotion_phrase(rng, req))


def _join(rng: random.Random, items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    if rng.random() < 0.15:
        return "; ".join(items)
    last = ", and " if rng.random() < 0.5 else " and "
    return ", ".join(items[:-1]) + last + items[-1]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _items(rng: random.Random, v: Sequence[int]) -> tuple[list[str], list[str]]:
    """Phrases for the present AUs (and named traces) and for the absent AUs picked as negatives."""
    thr = DEFAULT_OCCURRENCE_THRESHOLD
    positives: list[tuple[int, str]] = []  # (anatomical rank, phrase)
    skip: set[int] = set()
    if v[_I1] == v[_I2] >= thr and rng.random() < 0.4:
        positives.append((0, _render(rng, rng.choice(BROWS_RAISED), v[_I1])))
        skip |= {_I1, _I2}
    for i, au in enumerate(AUS):
        if i in skip or v[i] == 0:
            continue
        if v[i] < thr and rng.random() >= TRACE_MENTION_RATE:
            continue
        positives.append((i, _render(rng, rng.choice(AU_POSITIVE[au]), v[i])))

    negatives: list[str] = []
    absent = [i for i in range(len(AUS)) if v[i] == 0]
    if {_I1, _I2, _I4} <= set(absent) and rng.random() < NEGATIVE_RATE:
        negatives.append(rng.choice(BROWS_AT_REST))
        absent = [i for i in absent if i not in (_I1, _I2, _I4)]
    rate = 0.45 if not positives else NEGATIVE_RATE
    for i in absent:
        if len(negatives) < MAX_NEGATIVES and rng.random() < rate:
            negatives.append(rng.choice(AU_NEGATIVE[AUS[i]]))

    if rng.random() < 0.5:
        rng.shuffle(positives)  # otherwise anatomical order, brows down to jaw
    return [p for _, p in positives], negatives


def grammar_expand(req: ExpansionRequest) -> str:
    """A description of `req`'s target; deterministic from the request (its seed included)."""
    rng = random.Random(req.seed)
    positives, negatives = _items(rng, req.intensity)
    rng.shuffle(negatives)
    if negatives and positives and rng.random() < 0.5:
        items = list(positives)
        for neg in negatives:  # interleave, as in the paper's examples
            items.insert(rng.randrange(len(items) + 1), neg)
    else:
        items = positives + negatives
    opener = _opener(rng, req)
    if not items:
        return _cap(rng.choice(_EMPTY_ENDINGS).format(O=opener))
    body = _join(rng, items)
    frame = rng.randrange(6)
    if frame == 0:
        text = f"{opener}, with {body}."
    elif frame == 1:
        text = f"{opener}: {body}."
    elif frame == 2:
        text = f"{opener}. {_cap(body)}."
    elif frame == 3:
        text = f"{_cap(body)}; overall, {opener}."
    elif frame == 4:
        text = f"{opener}, showing {body}."
    else:
        text = f"{opener}, {body}."
    return _cap(text)


def check_expansion(text: str, req: ExpansionRequest, expander: str, fallback: bool, attempts: int) -> Expansion:
    """Parse `text` back and score it against the request's target (the prompt-vs-target check)."""
    parsed = parse_description(text)
    score = jaccard(occurrence(parsed), occurrence(req.vector))
    return Expansion(
        text=text,
        expander=expander,  # type: ignore[arg-type]
        fallback=fallback,
        attempts=attempts,
        parsed=tuple(int(x) for x in parsed),
        jaccard=score,
    )


class GrammarExpander:
    """The offline expander: the grammar for every request, no network, no cache needed."""

    def expand_batch(self, reqs: Sequence[ExpansionRequest]) -> tuple[list[Expansion], ExpandStats]:
        out = [check_expansion(grammar_expand(r), r, "grammar", False, 0) for r in reqs]
        low = sum(e.jaccard < 1.0 for e in out)
        if low:
            log.warning("grammar: %d of %d descriptions parse back to a different AU set", low, len(out))
        return out, ExpandStats(requests=len(reqs))

