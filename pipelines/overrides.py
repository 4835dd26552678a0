"""`--set a.b.c=value` on a nested config dict, and the one-line report of what pydantic rejected:
shared by `factory build/resume` and `factory train`.

It lives under pipelines/ because the training code (pipelines.maugen.train) may not import factory/.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


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


def format_validation_error(err: ValidationError, root: type[BaseModel], prefix: str = "config error") -> str:
    """First problem of a pydantic error as `PREFIX: a.b: what is wrong (got X)`; an unknown key lists the
    keys allowed beside it. One line, since the user fixes one key at a time."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-after"))
    if first["type"] == "extra_forbidden":
        allowed = allowed_keys(root, tuple(first["loc"][:-1]))
        return f"{prefix}: {loc}: unknown key; allowed here: {', '.join(allowed)}"
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    more = f" [and {len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    where = f"{loc}: " if loc else ""  # a model validator's error belongs to no one key
    return f"{prefix}: {where}{msg}{got_s}{more}"


def allowed_keys(root: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the section of `root` at `loc` (through optional sub-sections); [] past a leaf."""
    model: type[BaseModel] | None = root
    for part in loc:
        field = model.model_fields.get(str(part)) if model else None
        ann = field.annotation if field else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            # Optional sub-sections (X | None): take the model out of the union.
            for arg in getattr(ann, "__args__", ()):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    model = arg
    return sorted(model.model_fields) if model else []
