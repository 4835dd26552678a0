"""Prompts: FACS grammar, LLM expansion and the prompt -> AU parser that checks them both."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipelines.prompts.budget import TokenBudget
from pipelines.prompts.config import ExpandConfig, LLMConfig
from pipelines.prompts.grammar import GrammarExpander, grammar_expand
from pipelines.prompts.parser import parse_description, parse_details
from pipelines.prompts.types import Expansion, ExpandStats, ExpansionRequest

if TYPE_CHECKING:
    from pipelines.prompts.llm import LLMExpander

__all__ = [
    "ExpandConfig",
    "ExpandStats",
    "Expansion",
    "ExpansionRequest",
    "GrammarExpander",
    "LLMConfig",
    "TokenBudget",
    "grammar_expand",
    "make_expander",
    "parse_description",
    "parse_details",
]


def make_expander(
    cfg: ExpandConfig, cache_dir: str | None = None, budget: TokenBudget | None = None
) -> GrammarExpander | LLMExpander:
    """The expander `cfg` asks for; `cache_dir` (the build's) is used unless cfg.llm.cache_dir is set;
    `budget`: the generator's text-encoder limit, which every prompt must fit (None: no limit)."""
    if cfg.backend == "grammar":
        return GrammarExpander(budget)
    from pipelines.prompts.llm import LLMExpander  # openai is imported only when an LLM is configured

    return LLMExpander(cfg, cache_dir=cache_dir, budget=budget)
