"""Names of the graph's stages and rejection reasons, in graph order (stats, report and docs use them)."""

from __future__ import annotations

#: Rejection reasons in the order the checks run: a sample is counted under the first it fails.
REASONS: tuple[str, ...] = (
    "prompt_target_jaccard",
    "invalid_image",
    "realism",
    "label_prompt_jaccard",
    "label_consensus_jaccard",
    "over_quota",
)

#: Funnel stages: samples left after each stage, then those passing all checks, then those kept.
FUNNEL: tuple[tuple[str, str | None], ...] = (
    ("candidates", None),
    ("expand", "prompt_target_jaccard"),
    ("generate_valid", "invalid_image"),
    ("realism", "realism"),
    ("label_prompt", "label_prompt_jaccard"),
    ("label_consensus", "label_consensus_jaccard"),
)
FUNNEL_ORDER: tuple[str, ...] = (*(s for s, _ in FUNNEL), "checks", "accepted")
