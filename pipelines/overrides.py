"""`--set a.b.c=value` on a nested config dict: one parser for `factory build/resume` and `factory train`.

It lives under pipelines/ because the training code (pipelines.maugen.train) may not import factory/.
"""

from __future__ import annotations

from typing import Any

import yaml


class OverrideError(ValueError):
    """A `--set` that is not KEY=VALUE or that walks into a value; the message shows a correct one."""


def parse_value(text: str) -> Any:
    """`--set` values are YAML scalars/flow collections: 3, 0.5, true, png, [1, 2], {a: 1}; anything
    YAML cannot parse (`@x`, `[a`) stays the literal text, for the config's validation to judge."""
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text  # YAML 1.1 reads no/yes/on/off as booleans: `mixed_precision=no` means the word
    return value


def apply_override(tree: dict[str, Any], assignment: str, example: str = "build.shard_size=500") -> None:
    """Apply one `a.b.c=value` to a nested dict, in place; a section left empty in YAML (None) becomes {}."""
    if "=" not in assignment:
        raise OverrideError(f"--set {assignment!r}: expected KEY=VALUE, for example --set {example}")
    dotted, raw = assignment.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if not parts:
        raise OverrideError(f"--set {assignment!r}: empty key")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise OverrideError(f"--set {dotted}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = parse_value(raw)
