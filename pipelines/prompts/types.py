"""Boundary models of the prompt stage: what the factory asks for, what it gets back, and counters.

Kept free of any expander logic so that the factory, the grammar and the LLM expander share one
definition of a request and of an expansion.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.facs import AUS, EMOTIONS, INTENSITY_MAX, INTENSITY_MIN, NUM_AUS, STRENGTHS


class ExpansionRequest(BaseModel):
    """One target to describe: emotion, its strength and the 12 AU intensities v_pre (AUS order).

    `strength` is 1..4 (facs.STRENGTHS); 0 is accepted for `neutral` only, which is what the
    factory's sampler draws for neutral candidates (a neutral face has no strength).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    emotion: str
    strength: int
    intensity: tuple[int, ...]
    seed: int

    @field_validator("emotion")
    @classmethod
    def _emotion(cls, v: str) -> str:
        if v not in EMOTIONS:
            raise ValueError(f"emotion: unknown emotion {v!r}; allowed: {', '.join(EMOTIONS)}")
        return v

    @field_validator("strength", "seed", mode="before")
    @classmethod
    def _numpy_int(cls, v: Any) -> Any:
        return int(v) if isinstance(v, np.integer) else v

    @field_validator("intensity", mode="before")
    @classmethod
    def _intensity_to_ints(cls, v: Any) -> Any:
        # numpy vectors (int8 from the sampler) arrive here; turn them into plain ints first.
        if isinstance(v, np.ndarray):
            return tuple(int(x) for x in v.reshape(-1).tolist())
        if isinstance(v, (list, tuple)):
            return tuple(int(x) if isinstance(x, np.integer) else x for x in v)
        return v

    @field_validator("intensity")
    @classmethod
    def _intensity(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) != NUM_AUS:
            raise ValueError(f"intensity: needs {NUM_AUS} values, one per AU {list(AUS)}, got {len(v)}")
        bad = [f"AU{au}={x}" for au, x in zip(AUS, v) if not INTENSITY_MIN <= x <= INTENSITY_MAX]
        if bad:
            raise ValueError(f"intensity: values must be {INTENSITY_MIN}..{INTENSITY_MAX}; got {', '.join(bad)}")
        return v

    @model_validator(mode="after")
    def _strength(self) -> ExpansionRequest:
        if self.strength == 0 and self.emotion == "neutral":
            return self
        if self.strength not in STRENGTHS:
            allowed = ", ".join(f"{k} ({v[0]})" for k, v in STRENGTHS.items())
            raise ValueError(f"strength: {self.strength} is not allowed; allowed: {allowed} (0 for neutral only)")
        return self

    @property
    def vector(self) -> np.ndarray:
        """The target intensities as an int array in AUS order."""
        return np.asarray(self.intensity, dtype=np.int64)


class Expansion(BaseModel):
    """The description finally used for one request, who wrote it, and how well it matches."""

    model_config = ConfigDict(frozen=True)

    text: str
    expander: Literal["grammar", "llm"]
    fallback: bool = False
    attempts: int = 0
    parsed: tuple[int, ...]
    jaccard: float


class ExpandStats(BaseModel):
    """Counters of one batch (or one shard, after adding batches); `a + b` sums every field."""

    requests: int = 0
    calls: int = 0
    cache_hits: int = 0
    retries: int = 0
    reasks: int = 0
    fallbacks: int = 0
    shortened: int = 0  # grammar descriptions shortened to fit the text encoder (pipelines/prompts/budget.py)
    over_budget: int = 0  # descriptions that fit in no wording: scored on the part the encoder reads
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors_by_kind: dict[str, int] = Field(default_factory=dict)

    def __add__(self, other: ExpandStats) -> ExpandStats:
        if not isinstance(other, ExpandStats):
            return NotImplemented
        errors = dict(self.errors_by_kind)
        for k, n in other.errors_by_kind.items():
            errors[k] = errors.get(k, 0) + n
        fields = {
            name: getattr(self, name) + getattr(other, name)
            for name in type(self).model_fields
            if name != "errors_by_kind"
        }
        return ExpandStats(**fields, errors_by_kind=errors)

    def merge(self, other: ExpandStats) -> ExpandStats:
        """Same as `self + other` (for callers that prefer a method)."""
        return self + other

    def count_error(self, kind: str, n: int = 1) -> None:
        self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + n
