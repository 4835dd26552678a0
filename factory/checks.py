"""The build's checks: one ordered list of named, pure functions over candidate records.

A candidate is rejected under the first check it fails, so the order is part of the corpus'
definition: REASONS (the stats' rejection counts), FUNNEL (the report's samples-left-per-stage)
and every bench read it from CHECKS. `run_checks` applies the same list to any candidates, so a
bench or a user's script judges images exactly as a build does.

Each check reads only the record and the config and returns a Verdict: passed or not, and the
score it measured (None for checks that measure none, or that had nothing to judge: realism
without a realism model, consensus without detectors, training similarity without the generator's
training subjects). A check may measure without rejecting: training_similarity with its threshold
unset records the score of every sample it sees. `after` says which stage's output a check
needs: "expand" and "exemplar" checks run before the generator is asked (a rejected prompt or an
unusable exemplar costs no image).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from core.facs import jaccard

from .candidate import ACCEPTED, Candidate
from .config import FactoryConfig


class Verdict(NamedTuple):
    passed: bool
    score: float | None = None


@dataclass(frozen=True)
class Check:
    """A named check: `name` is its rejection reason and its score's key; `stage` its funnel stage."""

    name: str
    stage: str
    after: Literal["expand", "exemplar", "detect"]
    fn: Callable[[Candidate, FactoryConfig], Verdict]
    doc: str

    def __call__(self, cand: Candidate, cfg: FactoryConfig) -> Verdict:
        return self.fn(cand, cfg)


def label_consensus_jaccard(occ: np.ndarray, consensus_occ: np.ndarray, agree: np.ndarray) -> float:
    """Jaccard of the generator's labels and the detectors' consensus over the agreed AUs only.

    AUs the detectors do not agree on carry no evidence either way, so they are left out of both
    sets (both empty: 1.0, as for every Jaccard here; docs/facs.md).
    """
    return jaccard(occ & agree, consensus_occ & agree)


def _prompt_target(c: Candidate, cfg: FactoryConfig) -> Verdict:
    j = float(c.expansion.jaccard)
    return Verdict(j >= cfg.expand.tau, j)


def _exemplar(c: Candidate, cfg: FactoryConfig) -> Verdict:
    return Verdict(c.exemplar is None or c.exemplar.error is None)


def _valid_image(c: Candidate, cfg: FactoryConfig) -> Verdict:
    return Verdict(bool(c.valid))


def _realism(c: Candidate, cfg: FactoryConfig) -> Verdict:
    r = c.detection.realism if c.detection is not None else None
    if r is None:
        return Verdict(True)
    return Verdict(bool(r >= cfg.checks.realism), r)


def _label_prompt(c: Candidate, cfg: FactoryConfig) -> Verdict:
    lp = jaccard(c.prompt_occurrence(cfg.labels.occurrence_threshold), c.occurrence)
    return Verdict(lp >= cfg.checks.label_prompt_jaccard, lp)


def _label_consensus(c: Candidate, cfg: FactoryConfig) -> Verdict:
    d = c.detection
    if d is None:
        return Verdict(True)
    lc = label_consensus_jaccard(c.occurrence, d.occurrence, d.agree)
    return Verdict(lc >= cfg.checks.label_consensus_jaccard, lc)


def _training_similarity(c: Candidate, cfg: FactoryConfig) -> Verdict:
    d = c.detection
    sim = d.training_similarity if d is not None else None
    if sim is None:
        return Verdict(True)
    limit = cfg.checks.training_similarity
    return Verdict(limit is None or sim <= limit, sim)


#: The checks in the order they run.
CHECKS: tuple[Check, ...] = (
    Check("prompt_target_jaccard", "expand", "expand", _prompt_target,
          "the prompt, parsed back to AUs, matches the target AUs (Jaccard >= expand.tau)"),
    Check("exemplar", "exemplar", "exemplar", _exemplar,
          "the identity's exemplar photo could be read and its face masked (pool identities)"),
    Check("invalid_image", "generate_valid", "detect", _valid_image,
          "the image and labels hold no NaN/inf and the image is not blank"),
    Check("realism", "realism", "detect", _realism,
          "the realism discriminator's score >= checks.realism"),
    Check("label_prompt_jaccard", "label_prompt", "detect", _label_prompt,
          "the generator's labels match the prompt's AUs (Jaccard >= checks.label_prompt_jaccard)"),
    Check("label_consensus_jaccard", "label_consensus", "detect", _label_consensus,
          "the generator's labels match the detectors' consensus over agreed AUs (>= checks.label_consensus_jaccard)"),
    Check("training_similarity", "training_similarity", "detect", _training_similarity,
          "the face is none of MAUGen's training subjects: its highest identity similarity to them "
          "<= checks.training_similarity (unset: measured, never rejected; factory/leakage.py)"),
)

#: Not a check of the sample: it passed every check, but its plan cell was already full.
OVER_QUOTA = "over_quota"

#: Rejection reasons in the order the checks run: a candidate is counted under the first it fails.
REASONS: tuple[str, ...] = (*(c.name for c in CHECKS), OVER_QUOTA)

#: Funnel stages: candidates left after each check (then those passing all checks, then those kept).
FUNNEL: tuple[tuple[str, str | None], ...] = (("candidates", None), *((c.stage, c.name) for c in CHECKS))
FUNNEL_ORDER: tuple[str, ...] = (*(s for s, _ in FUNNEL), "checks", "accepted")


def first_failure(cand: Candidate, cfg: FactoryConfig, after: str | None = None) -> Check | None:
    """Run the checks (those of one stage, or all) in order on one candidate; the first it fails, or None.

    Every check that ran records its score in `cand.scores`; a failure sets `cand.fate` to its name.
    """
    for check in CHECKS:
        if after is not None and check.after != after:
            continue
        ok, score = check(cand, cfg)
        if score is not None:
            cand.scores[check.name] = score
        if not ok:
            cand.fate = check.name
            return check
    return None


def run_checks(cands: Sequence[Candidate], cfg: FactoryConfig) -> dict[str, int]:
    """Judge fully generated candidates as a build would (quotas aside); returns rejections by reason.

    Candidates that pass every check get the fate ACCEPTED.
    """
    counts = dict.fromkeys(REASONS, 0)
    for c in cands:
        failed = first_failure(c, cfg)
        if failed is None:
            c.fate = ACCEPTED
        else:
            counts[failed.name] += 1
    return counts
