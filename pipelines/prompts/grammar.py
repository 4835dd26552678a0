"""The offline FACS grammar: turns a target (emotion, strength, 12 AU intensities) into a description.

It is the default expander and the fallback of the LLM expander, so it must always describe the
target exactly: every active AU (intensity >= facs.DEFAULT_OCCURRENCE_THRESHOLD) is named with an
intensity word of its level (lexicon.py), trace AUs (intensity 1) are either left out or named as
"barely ...", and a random few absent AUs are stated as absent. Wording, order and sentence frame
vary with the request's seed (a private random.Random, never the global one), so that the text
encoder sees varied language for one label vector, and the same request always gives the same text.

A generator's text encoder reads a fixed number of tokens (`TokenBudget`, pipelines/prompts/budget.py);
a description longer than that would lose its last AUs, which the checks then hold against the image.
Given a budget, the grammar shortens a description that does not fit, in steps that drop only what the
target does not need: first the stated-absent AUs, then trace mentions and the emotion's flavour word,
then the shortest wording of each phrase. Every step names every active AU at its level.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence

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
from pipelines.prompts.budget import TokenBudget
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


#: Shortening steps of a description over the token budget: 0 full, 1 no negatives, 2 also no trace
#: mentions, no flavour word and the shortest frame, 3 also the shortest wording of every phrase and
#: the emotion without an opener around it.
COMPACT_STEPS = 4


#: Token count of a text (the budget's), used to pick the shortest wording at the last step.
Measure = Callable[[str], int]


def _pick(rng: random.Random, options: Sequence[str], measure: Measure | None = None) -> str:
    """A random option; with `measure` (the last compact step) the first of the fewest tokens."""
    if measure is not None:
        return min(options, key=lambda o: measure(o.replace("{a}", "").replace("{d}", "").lstrip("~")))
    return rng.choice(options)


def _render(rng: random.Random, template: str, level: int, measure: Measure | None = None) -> str:
    """Fill one phrase template with an intensity word of `level` (and maybe an article)."""
    countable = template.startswith("~")
    text = template.lstrip("~")
    if "{a}" in text:
        text = text.replace("{a}", _pick(rng, LEVEL_ADJECTIVES[level], measure))
    if "{d}" in text:
        adverb = _pick(rng, LEVEL_ADVERBS[level], measure)
        # "jaw lowered fully" as well as "jaw fully lowered": the adverb may trail the participle.
        if not text.startswith("{d}") and " " not in adverb and level >= 2 and rng.random() < 0.3:
            text = text.replace(" {d}", "") + " " + adverb
        else:
            text = text.replace("{d}", adverb)
    if countable and not text.startswith("a little") and rng.random() < 0.5 and measure is None:
        text = _article(text)
    return text


def _emotion_phrase(rng: random.Random, req: ExpansionRequest, compact: int = 0, measure: Measure | None = None) -> str:
    noun = _pick(rng, EMOTION_NOUNS[req.emotion], measure)
    if req.emotion == "neutral":
        return noun
    words = [_pick(rng, STRENGTH_WORDS[req.strength], measure)]
    flavours = EMOTION_FLAVOURS[req.emotion]
    if flavours and rng.random() < 0.3 and compact < 2:
        words.append(rng.choice(flavours))
    words.append(noun)
    return " ".join(w for w in words if w)


def _opener(rng: random.Random, req: ExpansionRequest, compact: int = 0, measure: Measure | None = None) -> str:
    openers = _NEUTRAL_OPENERS if req.emotion == "neutral" else _OPENERS
    if measure is not None:
        return _emotion_phrase(rng, req, compact, measure)  # "quiet fear: ...", no frame around it
    return rng.choice(openers).format(e=_emotion_phrase(rng, req, compact))


def _join(rng: random.Random, items: Sequence[str], compact: int = 0) -> str:
    if len(items) == 1:
        return items[0]
    if rng.random() < 0.15:
        return "; ".join(items)
    last = ", and " if rng.random() < 0.5 and compact < 2 else " and "
    return ", ".join(items[:-1]) + last + items[-1]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _items(
    rng: random.Random, v: Sequence[int], compact: int = 0, measure: Measure | None = None
) -> tuple[list[str], list[str]]:
    """Phrases for the present AUs (and named traces) and for the absent AUs picked as negatives."""
    thr = DEFAULT_OCCURRENCE_THRESHOLD
    positives: list[tuple[int, str]] = []  # (anatomical rank, phrase)
    skip: set[int] = set()
    if v[_I1] == v[_I2] >= thr and (rng.random() < 0.4 or measure is not None):
        positives.append((0, _render(rng, _pick(rng, BROWS_RAISED, measure), v[_I1], measure)))
        skip |= {_I1, _I2}
    for i, au in enumerate(AUS):
        if i in skip or v[i] == 0:
            continue
        if v[i] < thr and (rng.random() >= TRACE_MENTION_RATE or compact >= 2):
            continue
        positives.append((i, _render(rng, _pick(rng, AU_POSITIVE[au], measure), v[i], measure)))

    negatives: list[str] = []
    if compact >= 1:
        return [p for _, p in positives], negatives
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


class PromptTooLong(ValueError):
    """A target whose shortest description still exceeds the text encoder's token budget."""


def grammar_expand(req: ExpansionRequest, budget: TokenBudget | None = None) -> str:
    """A description of `req`'s target; deterministic from the request (its seed included). With a
    `budget`, the first of the shortening steps (COMPACT_STEPS) whose text fits it."""
    text, step = fit_description(req, budget)
    if step == COMPACT_STEPS:
        assert budget is not None
        raise PromptTooLong(
            f"the shortest description of {req.intensity} needs {budget.count(text)} tokens, the text encoder "
            f"reads {budget.max_tokens}: {text!r}; use a generator with a longer text encoder (model.max_length)"
        )
    return text


def fit_description(req: ExpansionRequest, budget: TokenBudget | None) -> tuple[str, int]:
    """(text, the shortening step that fits); step COMPACT_STEPS: none fits, text is the shortest."""
    if budget is None:
        return _describe(req, 0), 0
    for compact in range(COMPACT_STEPS):
        text = _describe(req, compact, budget.count if compact == COMPACT_STEPS - 1 else None)
        if budget.fits(text):
            return text, compact
    return text, COMPACT_STEPS


def fitted_expansion(
    req: ExpansionRequest, budget: TokenBudget | None, stats: ExpandStats, fallback: bool = False, attempts: int = 0
) -> Expansion:
    """The grammar's expansion of `req` within `budget`, counted in `stats`. A target that fits in no
    wording (about 1 in 20,000 of the default plan's at 48 tokens) is scored on the part the encoder
    reads, so the prompt-target check judges what the generator is actually told."""
    text, step = fit_description(req, budget)
    stats.shortened += int(0 < step < COMPACT_STEPS)
    if step == COMPACT_STEPS:
        assert budget is not None
        stats.over_budget += 1
        return check_expansion(text, req, "grammar", fallback, attempts, read=budget.readable(text))
    return check_expansion(text, req, "grammar", fallback, attempts)


def _describe(req: ExpansionRequest, compact: int, measure: Measure | None = None) -> str:
    rng = random.Random(req.seed)
    positives, negatives = _items(rng, req.intensity, compact, measure)
    rng.shuffle(negatives)
    if negatives and positives and rng.random() < 0.5:
        items = list(positives)
        for neg in negatives:  # interleave, as in the paper's examples
            items.insert(rng.randrange(len(items) + 1), neg)
    else:
        items = positives + negatives
    opener = _opener(rng, req, compact, measure)
    if not items:
        return _cap(_pick(rng, _EMPTY_ENDINGS, measure).format(O=opener))
    body = _join(rng, items, compact)
    frame = rng.randrange(6) if compact < 2 else 1
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


def check_expansion(
    text: str, req: ExpansionRequest, expander: str, fallback: bool, attempts: int, read: str | None = None
) -> Expansion:
    """Parse `text` (or `read`, the part of it the generator reads) back and score it against the
    request's target (the prompt-vs-target check)."""
    parsed = parse_description(text if read is None else read)
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
    """The offline expander: the grammar for every request, no network, no cache needed; within the
    generator's token budget when one is given."""

    def __init__(self, budget: TokenBudget | None = None):
        self.budget = budget

    def expand_batch(self, reqs: Sequence[ExpansionRequest]) -> tuple[list[Expansion], ExpandStats]:
        stats = ExpandStats(requests=len(reqs))
        out = [fitted_expansion(r, self.budget, stats) for r in reqs]
        low = sum(e.jaccard < 1.0 for e in out) - stats.over_budget
        if low:
            log.warning("grammar: %d of %d descriptions parse back to a different AU set", low, len(out))
        return out, stats

