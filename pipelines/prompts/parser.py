"""Prompt -> AU parser: reads a description (the grammar's or an LLM's) back to 12 AU intensities.

It is the check on every prompt (Jaccard of parsed vs target occurrence), so it has to read free
text as well as the grammar's: synonyms, intensity adverbs and negation ("no lip stretching",
"still cheeks", "nose without movement").

How it reads: the text is cut into clauses (punctuation and and/but/with/while ...). In each clause
it finds *mentions* (an anatomical phrase: "inner brows", "lip corners", "jaw", "smile") and
*modifiers* (intensity words of lexicon.py, negators, and direction words such as raised/lowered
for the parts whose AU depends on direction: brows, lip corners, eyes). Each modifier attaches to
the nearest mention of its clause; a prefix negator (no, not, without, neither, nor ...) applies to
every mention after it in the clause, or to the mention before it when none follows ("nose
without movement"). A negated mention reads 0; otherwise its level is the nearest intensity word,
or 3 when there is none. Specific mentions ("inner brows") override generic ones ("raised
brows" -> AU1 and AU2) for the same AU; several positive mentions of one AU take the maximum.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np

from core.facs import AUS, NUM_AUS, au_index
from pipelines.prompts.lexicon import LEVEL_ADJECTIVES, LEVEL_ADVERBS, PARSER_ONLY_LEVEL_WORDS

#: Level of a mention that names an AU without any intensity word.
DEFAULT_LEVEL = 3

# ----------------------------------------------------------------------------------------------
# Mentions. Each named group is one kind; the order decides ties at one start position.
_W = r"(?:(?!(?:and|but|or|nor|with)\b)[a-z']+ )"  # one filler word that is not a conjunction
_MENTIONS: tuple[tuple[str, str], ...] = (
    # lips / mouth closed: AU25 (and AU26 for the mouth) absent
    ("mouthclosed", r"mouth " + _W + r"{0,2}(?:closed|shut)\b|(?:closed|shut) mouth\b"),
    ("lipsclosed", r"lips? " + _W + r"{0,2}(?:closed|together|sealed|shut|pressed)\b|(?:closed|sealed|shut) lips\b"),
    ("stretch", r"(?:lips?|mouth) " + _W + r"{0,2}stretch\w*|stretch\w* (?:of )?(?:the )?(?:lips?|mouth)\b"
     r"|lip stretch\w*|(?:lips|mouth) " + _W + r"{0,2}(?:pulled|drawn) (?:sideways|wide|horizontally|taut|thin)\b"),
    ("corner", r"(?:lip|mouth) corners?\b|corners? of (?:the )?(?:mouth|lips)\b"),
    ("part", r"lips? part\w*|parting (?:of )?(?:the )?lips\b"
     r"|lips? " + _W + r"{0,2}(?:parted|apart|separated|open(?:ed)?)\b"
     r"|lip separation|separat\w+ (?:of |between )?(?:the )?lips\b|(?:parted|separated|open) lips\b"
     r"|gap between (?:the )?lips\b"),
    ("upperlip", r"upper lip " + _W + r"{0,2}(?:rais|lift|curl)\w*"),
    ("lowerlip", r"lower lip " + _W + r"{0,2}(?:pushed|rais|lift)\w*"),
    ("jaw", r"jaw\w*|(?:open(?:ed)?|gaping) mouth\b|mouth " + _W + r"{0,2}(?:open(?:ed|s)?|agape|gap\w*|drop\w*)\b"
     r"|mouth agape"),
    ("smile", r"smil\w*|grin\w*"),
    ("frown", r"frown\w*|scowl\w*"),
    ("brow", r"(?P<bq>inner_outer|inner|outer) "
     r"(?:(?:ends?|corners?|parts?|halves|sections?) of (?:the )?)?(?:eye)?brows?\b"
     r"|(?:eye)?brows?\b"),
    ("lid", r"upper (?:eye)?lids?\b|(?:eye)?lid rais\w*"),
    ("eyes", r"eyes?\b|wide eyed\b"),
    ("cheek", r"cheek\w*|crow'?s feet|lower (?:eye)?lids? " + _W + r"{0,2}(?:pushed|rais|lift)\w*"),
    ("nose", r"nose\b|nasal\b"),
    ("chin", r"chin\b|mentalis"),
)
_MENTION_RE = re.compile(r"\b(?:" + "|".join(f"(?P<{k}>{p})" for k, p in _MENTIONS) + r")")
_KINDS = tuple(k for k, _ in _MENTIONS)

#: Kinds that state absence by themselves ("lips together", "mouth closed").
_CLOSED = frozenset({"lipsclosed", "mouthclosed"})
#: Modifier kind -> the mention kinds it can attach to (direction words decide the AU of these).
_DIRECTED = {"up": frozenset({"brow", "corner"}), "down": frozenset({"brow", "corner"}), "wide": frozenset({"eyes"})}

# ----------------------------------------------------------------------------------------------
# Modifiers.
def _level_table() -> dict[str, int]:
    table: dict[str, int] = {}
    for source in (LEVEL_ADJECTIVES, LEVEL_ADVERBS, PARSER_ONLY_LEVEL_WORDS):
        for level, words in source.items():
            for w in words:
                table.setdefault(w, level)
    return table


_LEVELS = _level_table()
_PREFIX_NEG = ("no", "not", "without", "never", "neither", "nor", "lacking", "free of", "absence of", "none",
               "zero", "isn't", "aren't", "doesn't", "don't")
_ADJ_NEG = ("still", "relaxed", "neutral", "at rest", "motionless", "unmoved", "static", "steady", "inactive",
            "idle", "unchanged", "level", "smooth", "absent", "calm", "closed", "shut", "held still", "unmoving",
            "resting", "flat", "slack free")
_UP = ("raise", "raised", "raises", "raising", "lift", "lifted", "lifts", "lifting", "up", "upward", "upwards",
       "upturned", "uplifted", "arched", "arch", "arching", "elevated", "hiked", "curled up", "turned up", "upturn")
_DOWN = ("lowered", "lowering", "lower", "lowerer", "lowers", "down", "downward", "downwards", "downturned", "downturn",
         "drooping", "droop", "droops", "sagging", "sag", "depressed", "depression", "depressing", "depressor",
         "furrowed", "furrow", "furrowing", "furrows", "knitted", "knit", "knits", "drawn together",
         "pulled together", "pinched", "frowning", "turned down")
_WIDE = ("wide", "widened", "widening", "widen", "widens", "staring", "stare", "stares", "bulging", "opened wide",
         "open wide")


def _alternation(words: dict[str, str]) -> str:
    ordered = sorted(words, key=len, reverse=True)  # longest first: "barely visible" before "visible"
    return "|".join(re.escape(w).replace(r"\ ", " ") for w in ordered)


_MOD_KIND: dict[str, str] = {}
for _w in _LEVELS:
    _MOD_KIND[_w] = "level"
for _w in _PREFIX_NEG:
    _MOD_KIND[_w] = "neg_prefix"
for _w in _ADJ_NEG:
    _MOD_KIND[_w] = "neg_adj"
for _w in _UP:
    _MOD_KIND.setdefault(_w, "up")
for _w in _DOWN:
    _MOD_KIND.setdefault(_w, "down")
for _w in _WIDE:
    _MOD_KIND.setdefault(_w, "wide")
_MOD_RE = re.compile(r"\b(?:" + _alternation(_MOD_KIND) + r")\b")

_SPLIT_RE = re.compile(r"[.;:,!?()\[\]\n\"]|\b(?:and|but|while|whereas|with|plus|yet|although|though|whilst)\b")
_NORMALISE = str.maketrans({"’": "'", "‘": "'", "-": " ", "–": ",", "—": ",", "/": " "})
_INNER_OUTER = re.compile(r"\b(?:inner and outer|outer and inner|inner as well as outer)\b")


@dataclass(frozen=True)
class ParseResult:
    """What a description says about each AU (AUS order)."""

    intensity: np.ndarray  # int64 (12,), 0..5
    negated: np.ndarray  # bool (12,): stated absent ("no lip stretching")
    mentioned: np.ndarray  # bool (12,): named at all, present or absent


@dataclass
class _Mention:
    kind: str
    start: int
    end: int
    qualifier: str | None
    clause: int
    negated: bool = False
    level: int | None = None
    level_dist: int = 1 << 30
    direction: str | None = None
    direction_dist: int = 1 << 30


def _distance(m: _Mention, start: int, end: int) -> int:
    if end <= m.start:
        return m.start - end
    if start >= m.end:
        return start - m.end
    return 0


_AU = {au: au_index(au) for au in AUS}
_SIMPLE_KIND_AUS: dict[str, tuple[int, ...]] = {
    "stretch": (20,), "part": (25,), "upperlip": (9,), "lowerlip": (17,), "jaw": (26,), "smile": (12,),
    "frown": (4,), "lid": (5,), "cheek": (6,), "nose": (9,), "chin": (17,), "lipsclosed": (25,),
    "mouthclosed": (25, 26),
}


def _resolve(m: _Mention) -> tuple[tuple[int, ...], bool]:
    """The AUs a mention names and whether it names them specifically (over generic mentions)."""
    if m.kind in _SIMPLE_KIND_AUS:
        return _SIMPLE_KIND_AUS[m.kind], True
    d = m.direction
    if m.kind == "brow":
        if d == "down":
            return (4,), True
        if m.qualifier == "inner":
            return (1,), True
        if m.qualifier == "outer":
            return (2,), True
        if m.qualifier == "inner_outer" or d == "up":
            return (1, 2), False
        return ((1, 2, 4), False) if m.negated else ((), False)
    if m.kind == "corner":
        if d == "up":
            return (12,), True
        if d == "down":
            return (15,), True
        return ((12, 15), False) if m.negated else ((), False)
    if m.kind == "eyes":
        return ((5,), d == "wide") if (d == "wide" or m.negated) else ((), False)
    raise AssertionError(m.kind)


def parse_details(text: str) -> ParseResult:
    """Read `text` into per-AU intensity, stated-absent and mentioned flags (see module doc)."""
    t = _INNER_OUTER.sub("inner_outer", text.lower().translate(_NORMALISE))
    seps = list(_SPLIT_RE.finditer(t))
    bounds = [m.end() for m in seps]

    mentions: list[_Mention] = []
    by_clause: dict[int, list[_Mention]] = {}
    for mm in _MENTION_RE.finditer(t):
        kind = mm.lastgroup
        if kind == "bq":  # the qualifier group closes last inside a brow mention
            kind = "brow"
        m = _Mention(kind, mm.start(), mm.end(), mm.group("bq") if kind == "brow" else None,
                     bisect_right(bounds, mm.start()))
        m.negated = kind in _CLOSED
        mentions.append(m)
        by_clause.setdefault(m.clause, []).append(m)

    if mentions:
        mods = list(_MOD_RE.finditer(t))
        # "inner brows raised and drawn together": a clause with a direction word but no mention
        # after "and" speaks of the brows / lip corners of the clause before it.
        for md in mods:
            c = bisect_right(bounds, md.start())
            if c in by_clause or c == 0 or seps[c - 1].group(0) != "and" or _MOD_KIND[md.group(0)] not in _DIRECTED:
                continue
            prev = [m for m in by_clause.get(c - 1, ()) if m.kind in _DIRECTED[_MOD_KIND[md.group(0)]]]
            if prev:
                m = _Mention(prev[-1].kind, md.start(), md.start(), None, c)
                mentions.append(m)
                by_clause[c] = [m]
        for md in mods:
            clause = by_clause.get(bisect_right(bounds, md.start()))
            if not clause:
                continue
            word = md.group(0)
            kind = _MOD_KIND[word]
            s, e = md.start(), md.end()
            if kind == "neg_prefix":
                after = [m for m in clause if m.end > s]
                if after:
                    for m in after:
                        m.negated = True
                else:
                    min(clause, key=lambda m: _distance(m, s, e)).negated = True
                continue
            pool = [m for m in clause if m.kind in _DIRECTED[kind]] if kind in _DIRECTED else clause
            if not pool:
                continue
            # nearest mention; on a tie the following one (adjectives precede their noun)
            target = min(pool, key=lambda m: (_distance(m, s, e), m.start < s))
            dist = _distance(target, s, e)
            if kind == "neg_adj":
                target.negated = True
            elif kind == "level":
                if dist < target.level_dist:
                    target.level, target.level_dist = _LEVELS[word], dist
            elif dist < target.direction_dist:
                target.direction, target.direction_dist = kind, dist

    intensity = np.zeros(NUM_AUS, dtype=np.int64)
    negated = np.zeros(NUM_AUS, dtype=bool)
    mentioned = np.zeros(NUM_AUS, dtype=bool)
    # per AU: (specific?) -> list of (negated, level)
    votes: dict[int, dict[bool, list[tuple[bool, int]]]] = {}
    for m in mentions:
        aus, specific = _resolve(m)
        level = DEFAULT_LEVEL if m.level is None else m.level
        for au in aus:
            votes.setdefault(au, {}).setdefault(specific, []).append((m.negated, level))
    for au, by_spec in votes.items():
        i = _AU[au]
        vs = by_spec.get(True) or by_spec[False]
        mentioned[i] = True
        positive = [lvl for neg, lvl in vs if not neg]
        if positive:
            intensity[i] = max(positive)
        else:
            negated[i] = True
    return ParseResult(intensity=intensity, negated=negated, mentioned=mentioned)


def parse_description(text: str) -> np.ndarray:
    """12 AU intensity estimates (0..5, AUS order) read from a description."""
    return parse_details(text).intensity
