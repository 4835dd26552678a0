"""How many prompts fell back to the grammar, and why: the driver's stop rule, its progress line,
the end-of-build summary and `factory report` all read it from the shards' `expand` stats.

A user who asked for LLM prompts (expand.backend=llm) and gets the grammar's instead must be told,
and a build whose endpoint fails most requests (a dead model server, a wrong route behind a proxy)
must not run to its end on fallbacks: past `expand.max_fallback_share` it stops, committed shards
kept. The share counts the prompts of this run only, so a resume after the endpoint is fixed is
not stopped by the fallbacks of the shards committed before the fix.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .config import FactoryConfig
from .stops import EXIT_FALLBACKS, BuildStopped

#: The share is judged over at least this many prompts: one early fallback is not a broken endpoint.
MIN_PROMPTS = 50
#: errors_by_kind keys of the expander that are fallbacks (the rest are re-asks, retries, notes).
FALLBACK_PREFIX = "fallback_"


@dataclass
class FallbackCount:
    """Prompts asked of the expander, how many fell back to the grammar, and the reasons."""

    requests: int = 0
    fallbacks: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def add(self, expand: dict[str, Any]) -> FallbackCount:
        """Add one shard's `expand` stats (ExpandStats as JSON; {} for a shard without any)."""
        self.requests += int(expand.get("requests", 0))
        self.fallbacks += int(expand.get("fallbacks", 0))
        for kind, n in (expand.get("errors_by_kind") or {}).items():
            if kind.startswith(FALLBACK_PREFIX):
                self.reasons[kind[len(FALLBACK_PREFIX) :]] += int(n)
        return self

    def __add__(self, other: FallbackCount) -> FallbackCount:
        reasons = self.reasons + other.reasons
        return FallbackCount(self.requests + other.requests, self.fallbacks + other.fallbacks, reasons)

    @property
    def share(self) -> float | None:
        return self.fallbacks / self.requests if self.requests else None

    def main_reasons(self, n: int = 3) -> str:
        return ", ".join(f"{kind} x{k}" for kind, k in self.reasons.most_common(n)) or "none recorded"

    def describe(self) -> str:
        """'12% of 400 prompts fell back to the grammar (http_500 x40, verification x8)'."""
        if not self.requests:
            return "no prompts yet"
        why = f" ({self.main_reasons()})" if self.fallbacks else ""
        return f"{self.share:.0%} of {self.requests:,} prompts fell back to the grammar{why}"

    def exceeds(self, max_share: float) -> bool:
        """Over max_share, judged over at least MIN_PROMPTS prompts (so 1.0 never stops a build)."""
        return self.fallbacks > max_share * max(self.requests, MIN_PROMPTS)


def shards_count(stats: list[dict[str, Any]]) -> FallbackCount:
    """The fallbacks of committed shards, summed from their stats markers."""
    total = FallbackCount()
    for s in stats:
        total.add(s.get("expand") or {})
    return total


def endpoint(cfg: FactoryConfig) -> str | None:
    """'model M at URL' of an LLM expander; None for the grammar, which has no fallback."""
    llm = cfg.expand.llm
    if cfg.expand.backend != "llm" or llm is None:
        return None
    return f"model {llm.model} at {llm.base_url}"


def fallback_stop(cfg: FactoryConfig, seen: FallbackCount, out: str) -> BuildStopped:
    """BuildStopped for a run whose prompts fell back past expand.max_fallback_share."""
    return BuildStopped(
        f"{seen.describe()} in this run, over expand.max_fallback_share={cfg.expand.max_fallback_share:g}; "
        f"LLM endpoint: {endpoint(cfg)}",
        "make that endpoint answer (its server log says why) or accept more fallbacks (`--set "
        "expand.max_fallback_share=X` on the resume)",
        EXIT_FALLBACKS,
        out,
    )


def report_fields(cfg: FactoryConfig, stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The fallback fields `factory report` adds to its `expand` section (JSON, terminal, HTML)."""
    seen = shards_count(stats)
    return {
        "backend": cfg.expand.backend,
        "endpoint": endpoint(cfg),
        "fallback_share": seen.share,
        "fallback_reasons": dict(seen.reasons.most_common()),
        "max_fallback_share": cfg.expand.max_fallback_share,
    }


def report_line(expand: dict[str, Any]) -> str:
    """One line on the prompts of a report's `expand` section: who wrote them, how many fell back."""
    if expand.get("endpoint") is None:
        return "grammar (expand.backend=grammar: no LLM, nothing falls back)"
    seen = FallbackCount(int(expand.get("requests", 0)), int(expand.get("fallbacks", 0)),
                         Counter(expand.get("fallback_reasons") or {}))  # fmt: skip
    return (
        f"{expand['endpoint']}: {seen.describe()}; a build stops past expand.max_fallback_share="
        f"{expand['max_fallback_share']:g}"
    )
