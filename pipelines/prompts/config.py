"""Configuration of the expand stage (the `expand:` section of the factory's config tree)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LLMConfig(BaseModel):
    """An OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp server, ...)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1")
    model: str
    api_key_env: str = Field("OPENAI_API_KEY", description="name of the env var holding the key; unset -> 'EMPTY'")
    max_concurrency: int = Field(8, ge=1, description="requests in flight at once per expander")
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(4, ge=0, description="retries on 429/5xx/timeouts/connection errors")
    reask: int = Field(2, ge=0, description="re-asks when the reply fails verification")
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    max_tokens: int = Field(200, ge=1)
    structured_output: bool = Field(True, description="ask for a JSON-schema reply (response_format)")
    cache_dir: str | None = Field(None, description="reply cache (local path or fsspec URL); default: the build's")
    backoff_base_s: float = Field(0.5, gt=0, description="first retry delay; doubles per retry, with jitter")
    backoff_max_s: float = Field(20.0, gt=0)


class ExpandConfig(BaseModel):
    """Which expander writes the prompts, and how strictly a prompt must match its target."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["grammar", "llm"] = "grammar"
    tau: float = Field(0.67, gt=0.0, le=1.0, description="Jaccard(parsed prompt, target) needed to accept a reply")
    llm: LLMConfig | None = None

    @model_validator(mode="after")
    def _llm_needed(self) -> ExpandConfig:
        if self.backend == "llm" and self.llm is None:
            raise ValueError(
                "expand.llm is required when expand.backend=llm: set expand.llm.base_url and expand.llm.model "
                "(e.g. --set expand.llm.base_url=http://127.0.0.1:8000/v1 --set expand.llm.model=NAME), "
                "or use expand.backend=grammar"
            )
        return self
