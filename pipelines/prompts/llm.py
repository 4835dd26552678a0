"""LLM expander: descriptions written by a chat model behind any OpenAI-compatible endpoint.

Every reply is checked the same way as the grammar's text: parsed back to AUs and compared with
the target (Jaccard of occurrence sets >= tau), and scanned for identity words. A failing reply is
re-asked with a message naming the missed and extra AUs; when re-asks run out, or the server
cannot be reached, the grammar writes the description instead (counted, never raised), so a
build never stops for the LLM.

Replies are cached on disk (fsspec: local or object store), keyed by a hash of the whole request
(model, messages, temperature, max_tokens, schema, seed, attempt index), so a resumed build replays
its replies, re-asks included, without asking the server again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import os
import random
import re
import uuid
from collections.abc import Sequence
from typing import Any

import fsspec
import openai
from pydantic import BaseModel, ConfigDict, ValidationError

from core.facs import AU_DESCRIPTIONS, AU_NAMES, AUS, STRENGTHS, active_set, jaccard, occurrence
from pipelines.prompts.budget import TokenBudget
from pipelines.prompts.config import ExpandConfig, LLMConfig
from pipelines.prompts.grammar import check_expansion, fitted_expansion, grammar_expand
from pipelines.prompts.lexicon import LEVEL_ADJECTIVES, LEVEL_ADVERBS, identity_terms
from pipelines.prompts.parser import parse_description
from pipelines.prompts.targets import random_requests
from pipelines.prompts.types import Expansion, ExpandStats, ExpansionRequest

log = logging.getLogger(__name__)

#: Marker of the target block in the user message (the test server reads the target from it).
TARGET_MARKER = "TARGET"
#: Few-shot examples per request (written by the grammar).
FEW_SHOT = 2


class DescriptionReply(BaseModel):
    """The structured reply the model is asked for."""

    model_config = ConfigDict(extra="forbid")

    description: str


REPLY_SCHEMA: dict[str, Any] = DescriptionReply.model_json_schema()


def _scale_lines() -> str:
    names = {0: "absent", 1: "trace", 2: "slight", 3: "moderate", 4: "marked", 5: "maximal"}
    lines = ['0 absent: do not describe it as present; you may state it absent ("no lip stretching", "still cheeks")',
             "1 trace: below occurrence; leave it out or say \"barely ...\""]
    for level in range(2, 6):
        words = ", ".join(LEVEL_ADJECTIVES[level][:4] + LEVEL_ADVERBS[level][:3])
        lines.append(f"{level} {names[level]}: {words}")
    return "\n".join(lines)


SYSTEM_PROMPT = (
    "You write short descriptions of a facial expression for a face image generator, in the language of the "
    "Facial Action Coding System (FACS), but in plain words.\n"
    "The 12 Action Units (AUs) you describe:\n"
    + "\n".join(f"AU{au} {AU_NAMES[au]}: {AU_DESCRIPTIONS[au]}" for au in AUS)
    + "\nIntensity scale 0-5 and the words to use for each level:\n"
    + _scale_lines()
    + "\nRules: name the emotion with a qualifier of its strength; describe every AU with intensity 2 or more, "
    "with a word of its level and plain anatomical words (brows, eyes, upper lids, cheeks, nose, lip corners, "
    "chin, lips, jaw); never describe an AU of intensity 0 as present; you may state a few absent AUs as "
    "absent; vary the wording; one or two sentences. Never mention age, sex, gender, ethnicity or any other "
    "identity trait, and no pronouns such as he, she, his or her; describe only the face's movements.\n"
    'Reply with a JSON object {"description": "..."} and nothing else.'
)


def target_block(req: ExpansionRequest) -> str:
    """The target as a JSON block in the user message (machine-readable, also for the test server)."""
    target = {
        "emotion": req.emotion,
        "strength": STRENGTHS[req.strength][0] if req.strength in STRENGTHS else "none",
        "au_intensity": {f"AU{au}": int(x) for au, x in zip(AUS, req.intensity)},
    }
    return f"{TARGET_MARKER}:\n```json\n{json.dumps(target)}\n```"


def _user_message(req: ExpansionRequest) -> str:
    return "Describe the face for this target.\n" + target_block(req)


def build_messages(req: ExpansionRequest) -> list[dict[str, str]]:
    """System prompt, few-shot pairs written by the grammar (varied with the seed), then the target."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for ex in random_requests(FEW_SHOT, seed=req.seed % (1 << 63)):
        messages.append({"role": "user", "content": _user_message(ex)})
        messages.append({"role": "assistant", "content": json.dumps({"description": grammar_expand(ex)})})
    messages.append({"role": "user", "content": _user_message(req)})
    return messages


_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")
_DESCRIPTION_FIELD = re.compile(r'"description"\s*:\s*"((?:[^"\\]|\\.)*)')


#: Words a description of a face uses (every grammar prompt has one); a refusal or an off-topic reply
#: has none, and would otherwise pass the label check for a neutral target (no AUs read, none wanted).
_FACE_WORD = re.compile(
    r"\b(face|facial|expression|look|looks|brows?|eyebrows?|forehead|(eye)?lids?|eyes?|cheeks?|nose|nostrils?|"
    r"lips?|mouth|jaw|chin|smile|smiling|frown|frowning)\b",
    re.IGNORECASE,
)
MIN_WORDS, MAX_WORDS = 3, 150


def describes_a_face(text: str) -> bool:
    return bool(_FACE_WORD.search(text))


def extract_description(content: str) -> tuple[str | None, str]:
    """The description in a reply and how it was read: 'json', 'plain_text', 'salvaged', 'bad_length'
    (a JSON description outside MIN_WORDS..MAX_WORDS, e.g. empty) or 'unreadable'."""
    s = _FENCE.sub("", content.strip()).strip()
    try:
        text = DescriptionReply.model_validate_json(s).description.strip()
        return (text, "json") if MIN_WORDS <= len(text.split()) <= MAX_WORDS else (None, "bad_length")
    except ValidationError:
        pass
    if "{" not in s and "}" not in s and MIN_WORDS <= len(s.split()) <= MAX_WORDS:
        return s, "plain_text"  # a server that ignores response_format
    m = _DESCRIPTION_FIELD.search(s)
    if m and len(m.group(1).split()) >= MIN_WORDS:  # a truncated JSON reply
        try:
            return json.loads(f'"{m.group(1)}"').strip(), "salvaged"
        except json.JSONDecodeError:
            pass
    return None, "unreadable"


def _au_list(aus: Sequence[int]) -> str:
    return ", ".join(f"AU{au} ({AU_NAMES[au]}: {AU_DESCRIPTIONS[au]})" for au in sorted(aus))


class _GiveUp(Exception):
    """The server could not give a reply (retries exhausted or a non-retryable error)."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


class LLMExpander:
    """Expands requests through an OpenAI-compatible chat model, verified, cached, with grammar fallback."""

    def __init__(self, cfg: ExpandConfig, cache_dir: str | None = None, budget: TokenBudget | None = None):
        if cfg.llm is None:
            raise ValueError(
                "expand.llm is required for the LLM expander: set expand.llm.base_url and expand.llm.model"
            )
        self.cfg = cfg
        self.budget = budget  # the generator's text-encoder limit: longer replies are re-asked
        self.llm: LLMConfig = cfg.llm
        self.cache_dir = self.llm.cache_dir or cache_dir
        key = os.environ.get(self.llm.api_key_env)
        if not key:
            log.info("LLM expander: %s is not set; using the placeholder key 'EMPTY' (vLLM-style servers accept it)",
                     self.llm.api_key_env)
            key = "EMPTY"
        self._api_key = key
        self._structured = self.llm.structured_output
        self._jitter = random.Random()

    # -------------------------------------------------------------------------------- public
    def preflight(self) -> None:
        """One real request before any shard: a key, model or URL the server refuses stops the build here
        with one line (LLMConfigError) instead of a corpus whose every prompt silently fell back.
        A server that is down, slow or failing (5xx, 429) is only warned about: those are transient, and
        each failed request later falls back to the grammar, counted."""
        base, model, env = self.llm.base_url, self.llm.model, self.llm.api_key_env

        async def ask() -> Any:
            client = openai.AsyncOpenAI(base_url=base, api_key=self._api_key, timeout=self.llm.timeout_s, max_retries=0)
            try:
                return await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "Reply with OK."}], max_tokens=4
                )
            finally:
                await client.close()

        try:
            resp = _run(ask())
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise LLMConfigError(
                f"expand.llm: {base} refused the API key in ${env} (HTTP {e.status_code}); set {env} to a key this "
                "server accepts"
            ) from None
        except openai.NotFoundError:
            raise LLMConfigError(
                f"expand.llm: {base} has no model {model!r} or no chat-completions route (HTTP 404); set "
                "expand.llm.model to a model it serves, or expand.llm.base_url to its /v1 endpoint"
            ) from None
        except openai.BadRequestError as e:
            if re.search(r"model", str(e), re.I):
                raise LLMConfigError(
                    f"expand.llm: {base} does not serve model {model!r} (HTTP 400: {str(e)[:200]}); set expand.llm.model"
                ) from None
            log.warning("LLM preflight: %s answered HTTP 400 (%s); continuing", base, str(e)[:200])
        except openai.OpenAIError as e:  # down, timeout, 429, 5xx: transient
            log.warning("LLM preflight: %s did not answer (%s); failed requests fall back to the grammar, counted",
                        base, type(e).__name__)
        else:
            if not hasattr(resp, "choices"):
                raise LLMConfigError(
                    f"expand.llm: {base} answered HTTP 200 with something that is not a chat completion (an HTML page "
                    "from a proxy?); set expand.llm.base_url to the OpenAI-compatible /v1 endpoint"
                )

    def expand_batch(self, reqs: Sequence[ExpansionRequest]) -> tuple[list[Expansion], ExpandStats]:
        """Synchronous wrapper; runs its own event loop (in a helper thread if one is already running)."""
        return _run(self.aexpand_many(reqs))

    async def aexpand_many(self, reqs: Sequence[ExpansionRequest]) -> tuple[list[Expansion], ExpandStats]:
        """Expand all `reqs`, at most cfg.llm.max_concurrency HTTP requests in flight."""
        stats = ExpandStats(requests=len(reqs))
        sem = asyncio.Semaphore(self.llm.max_concurrency)
        client = openai.AsyncOpenAI(
            base_url=self.llm.base_url, api_key=self._api_key, timeout=self.llm.timeout_s, max_retries=0
        )
        try:
            out = await asyncio.gather(*(self._expand_one(client, sem, r, stats) for r in reqs))
        finally:
            await client.close()
        if stats.fallbacks:
            log.warning("LLM expander: %d of %d requests fell back to the grammar (%s)", stats.fallbacks, len(reqs),
                        stats.errors_by_kind)
        return list(out), stats

    # -------------------------------------------------------------------------------- one request
    async def _expand_one(
        self, client: openai.AsyncOpenAI, sem: asyncio.Semaphore, req: ExpansionRequest, stats: ExpandStats
    ) -> Expansion:
        messages = build_messages(req)
        target_occ = occurrence(req.vector)
        target_aus = active_set(req.vector)
        attempts = 0
        for attempt in range(self.llm.reask + 1):
            attempts += 1
            try:
                content = await self._complete(client, sem, messages, req.seed, attempt, stats)
            except _GiveUp as e:
                return self._fallback(req, attempts, f"fallback_{e.kind}", stats)
            text, how = extract_description(content)
            if how in ("plain_text", "salvaged"):
                stats.count_error(f"reply_{how}")
            if how == "bad_length":
                stats.count_error("reply_bad_length")
                feedback = (f"Write one description of {MIN_WORDS} to {MAX_WORDS} words, as a JSON object "
                            '{"description": "..."}.')
            elif text is None:
                stats.count_error("reply_unreadable")
                feedback = 'That reply was not readable. Reply only with a JSON object {"description": "..."}.'
            elif not describes_a_face(text):
                stats.count_error("reply_not_a_face")
                feedback = ("Describe the face itself (its brows, lids, cheeks, nose, lips, mouth and jaw), "
                            'as a JSON object {"description": "..."}.')
            elif self.budget is not None and (n := self.budget.count(text)) > self.budget.max_tokens:
                stats.count_error("reply_too_long")
                feedback = (f"That description is {n} tokens; the image model reads {self.budget.max_tokens}. "
                            "Rewrite it shorter: fewer words per movement, leave out what is absent.")
            elif found := identity_terms(text):
                stats.count_error("reply_identity_words")
                feedback = (f"Remove every identity word ({', '.join(sorted(found))}): describe only the face's "
                            "movements, with no age, sex, gender, ethnicity or pronouns.")
            else:
                parsed = parse_description(text)
                score = jaccard(occurrence(parsed), target_occ)
                if score >= self.cfg.tau:
                    return check_expansion(text, req, "llm", False, attempts)
                stats.count_error("reply_wrong_aus")
                got = active_set(parsed)
                parts = [
                    f"Your description reads as AUs {sorted(got) or 'none'}, "
                    f"the target is {sorted(target_aus) or 'none'}."
                ]
                if missed := target_aus - got:
                    parts.append(f"Describe, with a word of its level: {_au_list(missed)}.")
                if extra := got - target_aus:
                    parts.append(f"Do not describe as present: {_au_list(extra)}.")
                parts.append("Rewrite the description.")
                feedback = " ".join(parts)
            if attempt < self.llm.reask:
                stats.reasks += 1
                messages = [*messages, {"role": "assistant", "content": content}, {"role": "user", "content": feedback}]
        return self._fallback(req, attempts, "fallback_verification", stats)

    def _fallback(self, req: ExpansionRequest, attempts: int, reason: str, stats: ExpandStats) -> Expansion:
        stats.fallbacks += 1
        stats.count_error(reason)
        return fitted_expansion(req, self.budget, stats, fallback=True, attempts=attempts)

    # -------------------------------------------------------------------------------- HTTP + cache
    def _request_body(self, messages: list[dict[str, str]], seed: int, structured: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.llm.model,
            "messages": messages,
            "temperature": self.llm.temperature,
            "max_tokens": self.llm.max_tokens,
            "seed": seed % (1 << 31),
        }
        if structured:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "face_description", "schema": REPLY_SCHEMA, "strict": True},
            }
        return body

    async def _complete(
        self,
        client: openai.AsyncOpenAI,
        sem: asyncio.Semaphore,
        messages: list[dict[str, str]],
        seed: int,
        attempt: int,
        stats: ExpandStats,
    ) -> str:
        """The reply text for `messages` at re-ask `attempt`: from the cache, else from the server with retries."""
        # The key uses the configured structured_output, not the state after a server refused it, so a
        # resumed build finds replies cached before and after the switch.
        logical = self._request_body(messages, seed, self.llm.structured_output)
        key = hashlib.sha256(json.dumps({**logical, "attempt": attempt}, sort_keys=True).encode()).hexdigest()
        cached = await self._cache_get(key)
        if cached is not None:
            stats.cache_hits += 1
            return cached

        failures = 0
        while True:
            delay: float | None = None
            try:
                async with sem:
                    # built at send time: a refusal of response_format seen meanwhile applies here too
                    body = self._request_body(messages, seed, self._structured)
                    stats.calls += 1
                    resp = await client.chat.completions.create(**body)
            except openai.BadRequestError as e:
                # only a 400 about structured output turns it off (not, say, a context grown too long by re-asks)
                if "response_format" in body and re.search(r"response_format|json_schema|structured", str(e), re.I):
                    # Server without structured output: drop it for this and every later request.
                    log.warning("LLM server rejected response_format (%s); continuing with plain JSON prompts",
                                e.status_code)
                    stats.count_error("response_format_rejected")
                    self._structured = False
                    continue
                stats.count_error("http_400")
                raise _GiveUp("http_400") from e
            except openai.APITimeoutError:
                kind = "timeout"
            except openai.APIConnectionError:
                kind = "connection"
            except openai.APIStatusError as e:
                if e.status_code != 429 and e.status_code < 500:
                    stats.count_error(f"http_{e.status_code}")
                    raise _GiveUp(f"http_{e.status_code}") from e
                kind = f"http_{e.status_code}"
                delay = _retry_after(e.response.headers)
            except openai.OpenAIError as e:  # anything else the client raises (e.g. an unreadable body)
                kind = type(e).__name__
                log.warning("LLM request failed: %s", e)
            else:
                if not hasattr(resp, "choices"):  # a 200 that is no chat completion (a proxy's HTML page)
                    kind = "reply_not_chat_completion"
                    stats.count_error(kind)
                    if failures >= self.llm.max_retries:
                        raise _GiveUp(kind)
                    failures += 1
                    stats.retries += 1
                    continue
                if resp.usage is not None:
                    stats.prompt_tokens += resp.usage.prompt_tokens or 0
                    stats.completion_tokens += resp.usage.completion_tokens or 0
                content = (resp.choices[0].message.content or "") if resp.choices else ""
                await self._cache_put(key, content, resp.model)
                return content
            stats.count_error(kind)
            if failures >= self.llm.max_retries:
                raise _GiveUp(kind)
            failures += 1
            stats.retries += 1
            if delay is None:
                backoff = min(self.llm.backoff_max_s, self.llm.backoff_base_s * 2 ** (failures - 1))
                delay = backoff * (0.5 + 0.5 * self._jitter.random())
            await asyncio.sleep(min(delay, self.llm.backoff_max_s))

    def _cache_path(self, key: str) -> str:
        assert self.cache_dir is not None
        return f"{self.cache_dir.rstrip('/')}/llm/{key[:2]}/{key}.json"

    async def _cache_get(self, key: str) -> str | None:
        if self.cache_dir is None:
            return None
        try:
            return await asyncio.to_thread(self._cache_read, self._cache_path(key))
        except OSError as e:  # an unreachable cache costs a request, not the build
            log.warning("LLM cache: cannot read %s: %s", key, e)
            return None

    async def _cache_put(self, key: str, content: str, model: str | None) -> None:
        if self.cache_dir is None:
            return
        data = json.dumps({"content": content, "model": model, "key": key}).encode()
        try:
            await asyncio.to_thread(self._cache_write, self._cache_path(key), data)
        except OSError as e:  # a cache that cannot be written costs a re-ask on resume, not the build
            log.warning("LLM cache: cannot write %s: %s", key, e)

    @staticmethod
    def _cache_read(path: str) -> str | None:
        fs, p = fsspec.core.url_to_fs(path)
        try:
            raw = fs.cat_file(p)
        except FileNotFoundError:
            return None
        try:
            return str(json.loads(raw)["content"])
        except (ValueError, KeyError, TypeError):
            log.warning("LLM cache: ignoring unreadable entry %s", path)
            return None

    @staticmethod
    def _cache_write(path: str, data: bytes) -> None:
        fs, p = fsspec.core.url_to_fs(path)
        if "file" in fs.protocol:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            tmp = f"{p}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, p)  # atomic: a reader sees the old state or the whole entry
        else:
            fs.pipe_file(p, data)  # object stores publish a put whole


class LLMConfigError(ValueError):
    """The LLM endpoint refuses this configuration (key, model, URL): one line naming the fix."""


def _run(coro: Any) -> Any:
    """Run a coroutine to completion from sync code (in a helper thread if a loop is already running)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _retry_after(headers: Any) -> float | None:
    """Seconds the server asked us to wait (Retry-After or retry-after-ms), if it said."""
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(ms) / 1000)
        if (s := headers.get("retry-after")) is not None:
            return max(0.0, float(s))
    except (TypeError, ValueError):
        return None
    return None
