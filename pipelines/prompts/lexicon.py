"""The FACS vocabulary shared by the grammar (which writes it) and the parser (which reads it back).

One table per concept, so that every word the grammar can emit has exactly one meaning for the
parser. Intensity words follow the 0-5 scale of core/facs.py:

    level 1 (trace, below occurrence)  barely visible, barely perceptible, just perceptible, barely
    level 2 (FACS B)                   slight, mild, subtle, light, faint, gentle, soft, small
    level 3 (FACS C)                   moderate, clear, defined, definite, visible, noticeable, evident, distinct
    level 4 (FACS D)                   marked, strong, pronounced, prominent, firm, deep, considerable
    level 5 (FACS E)                   maximal, maximum, extreme, intense, full, severe, complete

Note that FACS itself calls C "marked or pronounced"; this table follows the product brief and
reads "marked"/"pronounced" as 4 (D), so "moderate/clear/defined" own level 3. The LLM expander
hands the same table to the model, so both sides of the round trip use one scale. A mention with
no intensity word reads as level 3.
"""

from __future__ import annotations

import re

from core.facs import AUS

#: Level -> adjectives the grammar uses before a noun phrase ("a moderate cheek raise").
LEVEL_ADJECTIVES: dict[int, tuple[str, ...]] = {
    1: ("barely visible", "barely perceptible", "just perceptible"),
    2: ("slight", "mild", "subtle", "light", "faint", "gentle", "soft", "small"),
    3: ("moderate", "clear", "defined", "definite", "visible", "noticeable", "evident", "distinct"),
    4: ("marked", "strong", "pronounced", "prominent", "firm", "deep", "considerable"),
    5: ("maximal", "maximum", "extreme", "intense", "full", "severe", "complete"),
}

#: Level -> adverbs the grammar uses with a participle ("markedly lowered brows").
LEVEL_ADVERBS: dict[int, tuple[str, ...]] = {
    1: ("barely", "just perceptibly"),
    2: ("slightly", "mildly", "subtly", "lightly", "faintly", "gently", "softly", "a little"),
    3: ("moderately", "clearly", "visibly", "noticeably", "evidently", "distinctly", "definitely"),
    4: ("markedly", "strongly", "firmly", "considerably", "deeply", "prominently", "sharply", "heavily"),
    5: ("maximally", "extremely", "intensely", "fully", "completely", "severely"),
}

#: Extra words only the parser knows (free LLM text), level -> words.
PARSER_ONLY_LEVEL_WORDS: dict[int, tuple[str, ...]] = {
    1: ("barely noticeable", "almost imperceptible", "imperceptible", "trace of", "trace", "hint of", "hint",
        "faintest", "minimal", "minimally", "barely there"),
    2: ("a bit", "slightest", "weak", "weakly", "somewhat", "lightest", "delicate", "delicately", "modest",
        "modestly"),
    3: ("medium", "apparent", "apparently", "obvious", "obviously", "definitive", "discernible", "discernibly",
        "perceptible", "perceptibly", "notable", "notably"),
    4: ("powerful", "powerfully", "heavy", "substantial", "substantially", "significant", "significantly",
        "emphatic", "emphatically", "sharp", "well defined", "very clear", "very clearly", "very visible",
        "very noticeable", "very noticeably", "very evident"),
    5: ("utmost", "totally", "total", "fierce", "fiercely", "as far as possible", "to the maximum",
        "to the limit", "very strong", "very strongly", "very marked", "very markedly", "very pronounced",
        "very deep", "very deeply", "extremely strong"),
}

#: Emotion nouns per emotion (the grammar picks one; the parser never reads them).
EMOTION_NOUNS: dict[str, tuple[str, ...]] = {
    "neutral": ("calm", "composure", "neutrality", "stillness", "repose"),
    "happiness": ("joy", "enjoyment", "delight", "amusement", "happiness", "cheerfulness", "glee", "contentment"),
    "sadness": ("sadness", "sorrow", "grief", "melancholy", "dejection", "gloom", "unhappiness"),
    "surprise": ("surprise", "astonishment", "amazement", "wonder", "disbelief"),
    "fear": ("fear", "alarm", "dread", "fright", "apprehension", "terror", "panic"),
    "anger": ("anger", "irritation", "annoyance", "indignation", "fury", "hostility", "exasperation"),
    "disgust": ("disgust", "revulsion", "distaste", "aversion", "repugnance", "loathing"),
    "contempt": ("contempt", "disdain", "scorn", "derision", "condescension"),
}

#: Optional flavour adjectives per emotion ("marked excited enjoyment"); none is an AU word.
EMOTION_FLAVOURS: dict[str, tuple[str, ...]] = {
    "neutral": (),
    "happiness": ("excited", "warm", "bright", "cheerful", "playful", "easy"),
    "sadness": ("quiet", "wistful", "weary", "heavy hearted", "lonely"),
    "surprise": ("sudden", "startled", "genuine", "breathless"),
    "fear": ("anxious", "sudden", "nervous", "tense"),
    "anger": ("simmering", "cold", "hot", "bitter"),
    "disgust": ("sour", "visceral", "queasy"),
    "contempt": ("cool", "dismissive", "haughty", "smug"),
}

#: Strength (facs.STRENGTHS key) -> qualifiers of the emotion noun.
STRENGTH_WORDS: dict[int, tuple[str, ...]] = {
    0: ("",),
    1: ("slight", "faint", "subtle", "gentle"),
    2: ("moderate", "mild", "quiet", "modest"),
    3: ("marked", "clear", "evident", "strong", "obvious"),
    4: ("intense", "extreme", "overwhelming", "deep", "powerful", "sheer"),
}

# Phrase templates. "{a}" takes a LEVEL_ADJECTIVES word, "{d}" a LEVEL_ADVERBS word. A template that
# starts with "~" is a singular countable noun phrase that may take the article "a"/"an".
#: AU -> templates that describe the AU as present.
AU_POSITIVE: dict[int, tuple[str, ...]] = {
    1: ("~{a} inner brow raise", "{d} raised inner brows", "inner brows {d} raised", "~{a} lift of the inner brows",
        "inner ends of the brows {d} lifted", "~{a} inner brow lift", "{d} lifted inner brows"),
    2: ("~{a} outer brow raise", "{d} raised outer brows", "outer brows {d} raised", "~{a} lift of the outer brows",
        "outer ends of the brows {d} lifted", "{d} arched outer brows", "~{a} outer brow lift"),
    4: ("{d} lowered brows", "brows {d} lowered", "~{a} brow furrow", "brows {d} drawn together", "~{a} frown",
        "{d} knitted brows", "~{a} lowering of the brows", "brows {d} pulled down"),
    5: ("{d} widened eyes", "eyes {d} widened", "~{a} upper lid raise", "upper lids {d} raised",
        "~{a} widening of the eyes", "{d} raised upper lids"),
    6: ("{d} raised cheeks", "cheeks {d} lifted", "~{a} cheek raise", "~{a} cheek lift", "{d} lifted cheeks",
        "~{a} lifting of the cheeks", "cheeks {d} pushed up"),
    9: ("~{a} nose wrinkle", "nose {d} wrinkled", "~{d} wrinkled nose", "~{a} wrinkling of the nose",
        "~{a} nose scrunch", "{a} nose wrinkling"),
    12: ("~{a} lip corner lift", "lip corners {d} raised", "{d} upturned lip corners", "~{a} smile",
         "lip corners {d} pulled up", "{d} lifted corners of the mouth", "~{a} upward pull of the lip corners"),
    15: ("lip corners {d} pulled down", "{d} downturned lip corners", "~{a} lip corner depression",
         "corners of the mouth {d} lowered", "{d} drooping lip corners", "~{a} downward pull of the mouth corners"),
    17: ("~{a} chin raise", "chin {d} raised", "~{d} raised chin", "~{a} upward push of the chin",
         "chin {d} pushed up", "~{d} tensed chin"),
    20: ("~{a} lip stretch", "lips {d} stretched sideways", "{d} stretched lips", "~{a} sideways lip stretch",
         "~{a} horizontal stretching of the lips", "{a} lip stretching"),
    25: ("~{a} lip part", "lips {d} parted", "{d} parted lips", "~{a} lip separation", "~{a} separation of the lips",
         "lips {d} apart"),
    26: ("~{a} jaw drop", "jaw {d} lowered", "~{d} dropped jaw", "~{a} jaw release", "~{a} lowering of the jaw",
         "jaw {d} dropped", "~{a} opening of the jaw"),
}

#: AU -> templates that state the AU is absent.
AU_NEGATIVE: dict[int, tuple[str, ...]] = {
    1: ("no inner brow raise", "still inner brows", "inner brows at rest", "relaxed inner brows",
        "inner brows without movement"),
    2: ("no outer brow raise", "still outer brows", "outer brows at rest", "relaxed outer brows",
        "outer brows without movement"),
    4: ("no brow lowering", "no frown", "brows not drawn together", "no furrowing of the brows"),
    5: ("no eye widening", "upper lids at rest", "relaxed upper lids", "no upper lid raise"),
    6: ("still cheeks", "relaxed cheeks", "no cheek raise", "cheeks at rest", "cheeks without movement"),
    9: ("no nose wrinkle", "nose without movement", "smooth nose", "relaxed nose", "no wrinkling of the nose",
        "nose at rest"),
    12: ("no smile", "no lip corner lift", "lip corners not raised", "no upward pull of the mouth corners"),
    15: ("no downturn of the lip corners", "lip corners not pulled down", "no lip corner depression"),
    17: ("still chin", "relaxed chin", "no chin raise", "chin at rest"),
    20: ("no lip stretching", "no lip stretch", "lips not stretched", "no sideways stretch of the lips"),
    25: ("closed lips", "lips together", "no lip part", "lips closed", "no parting of the lips"),
    26: ("no jaw drop", "jaw at rest", "jaw held still", "steady jaw", "closed jaw"),
}

#: Joint phrases for AU1+AU2 at one level (read back as both).
BROWS_RAISED: tuple[str, ...] = ("{d} raised brows", "brows {d} raised", "~{a} brow raise", "~{a} raising of the brows",
                                  "{d} lifted brows")
#: Joint negatives for AU1+AU2+AU4 (read back as all three absent).
BROWS_AT_REST: tuple[str, ...] = ("level brows", "relaxed brows", "still brows", "brows at rest")

#: Words that must never appear in a description: the product's prompts are identity-free
#: (identity comes from the identity encoder, never from the text).
IDENTITY_WORDS: frozenset[str] = frozenset(
    """man men woman women boy boys girl girls male female males females masculine feminine gender sex
    he she him his her hers himself herself guy guys lady ladies gentleman gentlemen sir madam
    mother father mom dad grandmother grandfather grandma grandpa son daughter wife husband
    old older elderly aged senior seniors young younger youth youthful teen teens teenage teenager child children
    kid kids baby toddler infant adult adults middle-aged
    asian african caucasian european hispanic latino latina latinx arab arabic indian
    ethnic ethnicity race racial skin-tone""".split()
)

_WORD_RE = re.compile(r"[a-z]+(?:-[a-z]+)*")


def identity_terms(text: str) -> set[str]:
    """The identity words (age, sex, gender, ethnicity) found in `text`; empty when it is clean."""
    return {w for w in _WORD_RE.findall(text.lower()) if w in IDENTITY_WORDS} | (
        {"years old"} if "years old" in text.lower() else set()
    )


assert set(AU_POSITIVE) == set(AUS) and set(AU_NEGATIVE) == set(AUS)
