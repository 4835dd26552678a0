"""LLM expander against a real HTTP server on 127.0.0.1 (tests/openai_server.py); the openai client is not mocked."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from openai_server import FakeOpenAIServer, Response, describe, target_of

from core.facs import AUS
from pipelines.prompts import ExpandConfig, LLMConfig, make_expander
from pipelines.prompts.llm import LLMExpander, extract_description
from pipelines.prompts.targets import random_requests
from pipelines.prompts.types import ExpansionRequest


@pytest.fixture
def server():
    with FakeOpenAIServer() as s:
        yield s


def _expander(base_url: str, cache_dir=None, **llm) -> LLMExpander:
    cfg = ExpandConfig(
        backend="llm",
        llm=LLMConfig(**{"base_url": base_url, "model": "test-model", "backoff_base_s": 0.01, "timeout_s": 5, **llm}),
    )
    exp = make_expander(cfg, cache_dir=cache_dir)
    assert isinstance(exp, LLMExpander)
    return exp


def _reqs(n: int, seed: int = 0):
    # targets with at least one active AU, so "wrong AUs" replies really are wrong
    return [r for r in random_requests(4 * n, seed=seed) if max(r.intensity) >= 2][:n]


def test_good_replies(server):
    reqs = _reqs(6)
    out, stats = _expander(server.base_url).expand_batch(reqs)
    assert [e.expander for e in out] == ["llm"] * 6
    assert all(not e.fallback and e.attempts == 1 and e.jaccard == 1.0 for e in out)
    assert {e.text for e in out} == {describe(target_of(b)) for b in server.requests}
    assert (stats.calls, stats.retries, stats.reasks, stats.fallbacks, stats.cache_hits) == (6, 0, 0, 0, 0)
    assert stats.prompt_tokens > 0 and stats.completion_tokens > 0
    body = server.requests[0]
    assert body["model"] == "test-model" and body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["properties"]["description"]["type"] == "string"
    system = body["messages"][0]["content"]
    assert "AU12" in system and "lip corners pulled up and out" in system and "ethnicity" in system
    assert sum(m["role"] == "assistant" for m in body["messages"]) >= 1  # few-shot examples


def test_plain_text_reply_is_used_and_counted(server):
    server.push("plain_text")
    out, stats = _expander(server.base_url).expand_batch(_reqs(1))
    assert out[0].expander == "llm" and out[0].jaccard == 1.0
    assert stats.errors_by_kind.get("reply_plain_text") == 1 and stats.reasks == 0


def test_malformed_json_is_reasked(server):
    server.push("malformed_json")
    out, stats = _expander(server.base_url).expand_batch(_reqs(1))
    assert out[0].expander == "llm" and out[0].attempts == 2 and not out[0].fallback
    assert stats.errors_by_kind.get("reply_unreadable") == 1 and stats.reasks == 1 and stats.calls == 2
    assert "not readable" in server.requests[1]["messages"][-1]["content"]


def test_wrong_aus_reasked_then_grammar_fallback(server):
    server.default = "wrong_aus"
    reqs = _reqs(3)
    out, stats = _expander(server.base_url, reask=2).expand_batch(reqs)
    assert all(e.expander == "grammar" and e.fallback and e.attempts == 3 and e.jaccard == 1.0 for e in out)
    assert stats.calls == 9 and stats.reasks == 6 and stats.fallbacks == 3
    assert stats.errors_by_kind["reply_wrong_aus"] == 9 and stats.errors_by_kind["fallback_verification"] == 3
    corrective = server.requests[-1]["messages"][-1]["content"]
    assert "target is" in corrective and "Do not describe as present" in corrective


def test_identity_words_are_rejected(server):
    server.push("identity")
    out, stats = _expander(server.base_url).expand_batch(_reqs(1))
    assert out[0].expander == "llm" and out[0].attempts == 2
    assert "woman" not in out[0].text and stats.errors_by_kind["reply_identity_words"] == 1


def test_429_retry_after_then_success(server):
    server.push("rate_limit")
    server.retry_after = "1"
    t0 = time.perf_counter()
    out, stats = _expander(server.base_url).expand_batch(_reqs(1))
    assert time.perf_counter() - t0 >= 0.9  # Retry-After honoured (backoff alone would be ~0.01 s)
    assert out[0].expander == "llm" and stats.retries == 1 and stats.errors_by_kind == {"http_429": 1}
    assert stats.calls == 2


def test_500_then_success(server):
    server.push("error_500", "error_500")
    out, stats = _expander(server.base_url).expand_batch(_reqs(1))
    assert out[0].expander == "llm" and stats.retries == 2 and stats.errors_by_kind == {"http_500": 2}


def test_slow_server_times_out_and_retries(server):
    server.push("slow")
    server.slow_s = 3.0
    out, stats = _expander(server.base_url, timeout_s=0.5).expand_batch(_reqs(1))
    assert out[0].expander == "llm" and stats.retries == 1 and stats.errors_by_kind == {"timeout": 1}


def test_server_down_falls_back_for_every_request():
    with socket.socket() as s:  # a port held bound but never listening: every connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        reqs = _reqs(5)
        out, stats = _expander(f"http://127.0.0.1:{port}/v1", max_retries=2).expand_batch(reqs)
    assert all(e.expander == "grammar" and e.fallback and e.jaccard == 1.0 for e in out)
    assert stats.fallbacks == 5 and stats.errors_by_kind["fallback_connection"] == 5
    assert stats.errors_by_kind["connection"] == 15 and stats.retries == 10


def test_response_format_rejected_is_dropped_and_remembered(server):
    server.default = "reject_format"
    out, stats = _expander(server.base_url, max_concurrency=1).expand_batch(_reqs(3))
    assert all(e.expander == "llm" for e in out)
    with_format = [b for b in server.requests if "response_format" in b]
    assert len(with_format) == 1 and len(server.requests) == 4
    assert stats.errors_by_kind == {"response_format_rejected": 1}


def test_another_400_gives_up_that_request_and_keeps_structured_output(server):
    server.push(lambda body: Response(status=400, error="maximum context length is 4096 tokens"))
    out, stats = _expander(server.base_url, max_concurrency=1).expand_batch(_reqs(2))
    assert [e.expander for e in out] == ["grammar", "llm"] and out[0].fallback
    assert stats.errors_by_kind == {"http_400": 1, "fallback_http_400": 1}, stats.errors_by_kind
    assert all("response_format" in b for b in server.requests)  # the next request still asks for JSON


def test_cache_second_run_makes_no_http_calls(server, tmp_path):
    server.push("wrong_aus")  # a re-ask is replayed from the cache too
    reqs = _reqs(8)
    out1, st1 = _expander(server.base_url, cache_dir=str(tmp_path)).expand_batch(reqs)
    n = len(server.requests)
    assert n == 9 and st1.cache_hits == 0
    out2, st2 = _expander(server.base_url, cache_dir=str(tmp_path)).expand_batch(reqs)
    assert len(server.requests) == n, "a resumed expander asked the server again"
    assert st2.calls == 0 and st2.cache_hits == 9
    assert [e.text for e in out1] == [e.text for e in out2]
    files = list(tmp_path.rglob("*.json"))
    assert len(files) == 9 and not list(tmp_path.rglob("*.tmp-*"))
    assert "content" in json.loads(files[0].read_text())


def test_bounded_concurrency(server):
    server.default = "slow"
    server.slow_s = 0.1
    _expander(server.base_url, max_concurrency=3).expand_batch(_reqs(12))
    assert 2 <= server.max_in_flight <= 3


def test_expand_batch_inside_running_loop(server):
    async def main():
        return _expander(server.base_url).expand_batch(_reqs(2))

    out, stats = asyncio.run(main())
    assert [e.expander for e in out] == ["llm", "llm"] and stats.calls == 2


def test_extract_description():
    reply = '{"description": "Raised cheeks and a smile."}'
    assert extract_description(reply) == ("Raised cheeks and a smile.", "json")
    assert extract_description('```json\n{"description": "Raised cheeks, a smile."}\n```')[1] == "json"
    assert extract_description('{"description": "Raised cheeks, a clear smile')[1] == "salvaged"
    assert extract_description("{broken")[0] is None
    assert extract_description('{"description": ""}') == (None, "bad_length")
    assert extract_description(json.dumps({"description": "smile " * 151})) == (None, "bad_length")


def test_an_empty_or_refusing_reply_is_not_taken_for_a_neutral_face():
    """Both read as 'no AUs', which a neutral target wants: the reply must describe a face at all."""
    neutral = ExpansionRequest(emotion="neutral", strength=0, intensity=(0,) * len(AUS), seed=5)
    for content, kind, hint in [
        (json.dumps({"description": ""}), "reply_bad_length", "3 to 150 words"),
        ("I am sorry, but I cannot help with that request.", "reply_not_a_face", "Describe the face itself"),
    ]:
        with FakeOpenAIServer(default=lambda body, c=content: Response(content=c)) as s:
            out, stats = _expander(s.base_url, reask=1).expand_batch([neutral])
        assert out[0].expander == "grammar" and out[0].fallback, (kind, out[0])
        assert stats.errors_by_kind.get(kind) == 2 and stats.reasks == 1, (kind, stats.errors_by_kind)
        assert hint in s.requests[1]["messages"][-1]["content"]


def test_callable_behaviour_neutral_target():
    neutral = ExpansionRequest(emotion="neutral", strength=0, intensity=(0,) * len(AUS), seed=5)
    reply = Response(content=json.dumps({"description": "A calm face: still brows, no smile, lips together."}))
    with FakeOpenAIServer(default=lambda body: reply) as s:
        out, stats = _expander(s.base_url, reask=0).expand_batch([neutral])
    assert out[0].expander == "llm" and out[0].jaccard == 1.0 and sum(out[0].parsed) == 0
    assert len(s.requests) == 1 and stats.calls == 1


def test_a_reply_longer_than_the_text_encoder_reads_is_reasked(server):
    from pipelines.maugen.builtin import resolve_checkpoint
    from pipelines.prompts import TokenBudget

    budget = TokenBudget.from_tokenizer(resolve_checkpoint("builtin:tiny-puppet") / "tokenizer")
    req = _reqs(1)[0]
    def padded(body):
        text = describe(target_of(body)) + " " + " ".join(["The rest of the face stays calm and still."] * 6)
        return Response(content=json.dumps({"description": text}))

    server.push(padded)
    cfg = ExpandConfig(backend="llm", llm=LLMConfig(base_url=server.base_url, model="test-model", timeout_s=5))
    out, stats = make_expander(cfg, budget=budget).expand_batch([req])
    assert stats.errors_by_kind["reply_too_long"] == 1 and stats.reasks == 1
    assert out[0].expander == "llm" and out[0].attempts == 2 and budget.fits(out[0].text)
    assert "48" in server.requests[1]["messages"][-1]["content"]
