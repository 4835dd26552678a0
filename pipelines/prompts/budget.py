"""How much of a prompt a generator reads: its text encoder's token limit, counted by its own tokenizer.

MAUGen's text encoder has a fixed number of positions (the shipped tiny model 48, CLIP in SD-1.5 77,
both with the begin and end tokens). A prompt past that is cut, so the image never depicts the AUs named
at its end while the checks compare the image with all of them. The expanders use this budget to write
prompts that fit (pipelines/prompts/grammar.py shortens; the LLM path re-asks, then falls back).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TokenBudget:
    """A tokenizer and the most tokens (special tokens included) its text encoder reads."""

    tokenizer: Any
    max_tokens: int

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, truncation=False)["input_ids"])

    def fits(self, text: str) -> bool:
        return self.count(text) <= self.max_tokens

    def readable(self, text: str) -> str:
        """The part of `text` the text encoder reads (what is left after it is cut at max_tokens)."""
        ids = self.tokenizer(text, truncation=True, max_length=self.max_tokens)["input_ids"]
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    @classmethod
    def from_tokenizer(cls, folder: str | Path) -> TokenBudget:
        """The budget of a saved tokenizer folder (a MAUGen checkpoint's `tokenizer/`): its model_max_length."""
        import transformers

        transformers.logging.set_verbosity_error()  # "sequence longer than ..." is what this budget checks
        tok = transformers.AutoTokenizer.from_pretrained(str(folder))
        limit = int(tok.model_max_length)
        if limit <= 2 or limit > 100_000:  # transformers' "no limit" sentinel is ~1e30
            raise ValueError(f"tokenizer {folder} declares no usable model_max_length ({limit}): cannot budget prompts")
        return cls(tok, limit)
