"""`factory build` with expand.backend=llm against a real OpenAI-protocol server on 127.0.0.1."""

from __future__ import annotations

import json
import socket

import pytest
import webdataset as wds
from openai_server import FakeOpenAIServer

from conftest import FAST, SMALL_RAY, factory, shard_stats


@pytest.fixture
def server():
    with FakeOpenAIServer() as s:
        yield s


def _llm_args(server: FakeOpenAIServer | str, out) -> list[str]:
    base_url = server if isinstance(server, str) else server.base_url
    return [
        "--target", "60", "--shard-size", "30", "--out", str(out), *FAST,
        "--set", "expand.backend=llm",
        "--set", f"expand.llm.base_url={base_url}",
        "--set", "expand.llm.model=test-model",
        "--set", "expand.llm.backoff_base_s=0.01",
    ]  # fmt: skip


KEY = "sk-test-only-the-driver-has-it"


@pytest.fixture
def keyed_server():
    """A server that answers 401 to every request without KEY."""
    with FakeOpenAIServer(api_key=KEY) as s:
        yield s


def test_llm_build_records_expander_and_resume_hits_the_cache(keyed_server, shared_ray, tmp_path):
    """On a Ray cluster the driver joins (whose workers have their node's env, not the driver's): the API key
    set where `factory build` runs reaches the shard workers that call the endpoint."""
    server, env = keyed_server, {**shared_ray, "OPENAI_API_KEY": KEY}
    out = tmp_path / "out"
    # a retry; one fallback to the grammar for wrong AUs; one for 200s that are no chat completion (a proxy's page)
    server.push("error_500", "wrong_aus", "wrong_aus", "wrong_aus", "html", "html", "html")
    factory("build", *_llm_args(server, out), env=env, check=True)
    samples = list(wds.WebDataset(sorted(str(p) for p in (out / "shards").glob("*.tar")), shardshuffle=False))
    assert len(samples) == 60
    metas = [json.loads(s["json"]) for s in samples]
    expanders = [(m["expander"], m["expand_fallback"]) for m in metas]
    assert expanders.count(("llm", False)) >= 58 and set(expanders) <= {("llm", False), ("grammar", True)}
    stats = list(shard_stats(out).values())
    total = {k: sum(s["expand"][k] for s in stats) for k in ("calls", "retries", "cache_hits", "fallbacks")}
    assert total["calls"] >= 60 and total["retries"] >= 1 and total["cache_hits"] == 0
    assert sum(s["expand"]["errors_by_kind"].get("reply_not_chat_completion", 0) for s in stats) == 3
    asked = len(server.requests)
    assert asked >= 60

    # lose one committed shard: the resume redoes it from the cache, asking the server nothing
    shard1 = sorted((out / "shards").glob("mifa-000001.*"))
    tar_before = (out / "shards" / "mifa-000001.tar").read_bytes()
    for p in shard1:
        p.unlink()
    p = factory("resume", str(out), *SMALL_RAY, env=env)
    assert p.returncode == 0, p.stderr
    assert len(server.requests) == asked
    redone = json.loads((out / "shards" / "mifa-000001.stats.json").read_text())
    assert redone["expand"]["calls"] == 0 and redone["expand"]["cache_hits"] >= 30
    assert (out / "shards" / "mifa-000001.tar").read_bytes() == tar_before
    assert server.refused_keys == 0


def test_llm_server_down_stops_the_build_and_a_resume_may_accept_the_grammar(shared_ray, tmp_path):
    """Nothing listens at base_url: the preflight only warns (a server may come back), every prompt
    falls back, and past expand.max_fallback_share the build stops in one line, exit 4. A resume
    that accepts fallbacks (expand.max_fallback_share=1) completes the corpus from the grammar."""
    # A port held by a bound socket that never listens: connections are refused for the whole test.
    # (Stopping a server and reusing its port is racy: Ray's own processes may bind it meanwhile.)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        base_url = f"http://127.0.0.1:{held.getsockname()[1]}/v1"
        args = _llm_args(base_url, tmp_path / "out")
        p = factory("build", *args, "--set", "expand.llm.max_retries=0", "--set", "runtime.max_shards_in_flight=1",
                    env=shared_ray)  # fmt: skip
    assert p.returncode == 4, p.stderr[-3000:]
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("build stopped: 100% of ") and "fell back to the grammar (connection x" in line, line
    assert f"at {base_url}; 1/2 shards committed and kept" in line and "Traceback" not in p.stderr, line
    p = factory("resume", str(tmp_path / "out"), *SMALL_RAY, "--set", "expand.max_fallback_share=1", env=shared_ray)
    assert p.returncode == 0, p.stderr[-3000:]
    metas = [
        json.loads(s["json"])
        for s in wds.WebDataset(sorted(str(p) for p in (tmp_path / "out" / "shards").glob("*.tar")), shardshuffle=False)
    ]
    assert len(metas) == 60 and all(m["expander"] == "grammar" and m["expand_fallback"] for m in metas)


@pytest.mark.parametrize(
    "answer, must_say",
    [
        ("unauthorized", "refused the API key in $OPENAI_API_KEY (HTTP 401); set OPENAI_API_KEY"),
        ("no_model", "has no model 'test-model' or no chat-completions route (HTTP 404)"),
        ("html", "answered HTTP 200 with something that is not a chat completion"),
    ],
)
def test_a_misconfigured_llm_endpoint_stops_the_build_before_any_shard(server, tmp_path, answer, must_say):
    """A wrong key, an unknown model or a proxy's HTML page: one line naming base_url/model/key, exit 2,
    nothing written; after the fix the same command builds."""
    out = tmp_path / "out"
    server.ping = answer
    p = factory("build", *_llm_args(server, out))
    assert p.returncode == 2 and must_say in p.stderr and server.base_url in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert must_say in last and "Traceback" not in p.stderr, p.stderr  # the error is one line, after the logs
    assert not out.exists() and not server.requests  # no shard ran, nothing was written (so the fixed command builds)


@pytest.mark.slow  # the default suite stays under 15 min; `bash tests/run.sh -m slow` runs it
def test_an_endpoint_that_fails_its_requests_stops_the_build_past_max_fallback_share(server, tmp_path):
    """The endpoint answers the preflight but 500s every prompt: the share of fallbacks shows in the
    progress line, and past expand.max_fallback_share (0.2) the build stops in one line, exit 4,
    the committed shard kept; after the fix `factory resume` goes on, and the summary and the
    report (terminal, JSON, HTML) say how many prompts the grammar wrote."""
    out = tmp_path / "out"
    server.default = "error_500"
    args = [*_llm_args(server, out), "--set", "expand.llm.max_retries=0", "--set", "runtime.max_shards_in_flight=1",
            "--target", "60", "--shard-size", "20"]  # fmt: skip
    p = factory("build", *args, "--set", "runtime.progress=true")
    assert p.returncode == 4, p.stderr[-3000:]
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("build stopped: 100% of ") and "prompts fell back to the grammar (http_500 x" in line, line
    assert "in this run, over expand.max_fallback_share=0.2; " in line, line
    assert f"LLM endpoint: model test-model at {server.base_url}; 1/3 shards committed and kept; " in line, line
    assert line.endswith(f"(`--set expand.max_fallback_share=X` on the resume), then run `factory resume {out}`"), line
    assert "Traceback" not in p.stderr and "| prompts fell back 100%" in p.stderr, p.stderr[-3000:]
    kept = {f.name: f.read_bytes() for f in (out / "shards").iterdir()}
    assert sorted(kept) == ["mifa-000000.parquet", "mifa-000000.stats.json", "mifa-000000.tar"]
    stats0 = json.loads(kept["mifa-000000.stats.json"])["expand"]
    assert stats0["fallbacks"] == stats0["requests"] == stats0["errors_by_kind"]["fallback_http_500"]

    server.default = "good"  # the endpoint is fixed: the resume's own prompts do not fall back
    p = factory("resume", str(out), *SMALL_RAY)
    assert p.returncode == 0, p.stderr[-3000:]
    assert {n: (out / "shards" / n).read_bytes() for n in kept} == kept
    requests = sum(s["expand"]["requests"] for s in shard_stats(out).values())
    share = stats0["requests"] / requests
    summary = f"prompts from model test-model at {server.base_url}: {share:.0%} of {requests:,} prompts fell back"
    assert summary in p.stderr, p.stderr[-3000:]

    rep = json.loads(factory("report", str(out), "--json", "--html", str(tmp_path / "r.html"), check=True).stdout)
    assert rep["expand"]["fallback_share"] == pytest.approx(share) and rep["expand"]["backend"] == "llm"
    assert rep["expand"]["fallback_reasons"] == {"http_500": stats0["requests"]}
    told = f"{share:.0%} of {requests:,} prompts fell back to the grammar (http_500 x{stats0['requests']})"
    assert told in factory("report", str(out), check=True).stdout
    assert told in (tmp_path / "r.html").read_text()
