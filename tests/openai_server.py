"""A real OpenAI-compatible chat-completions server on 127.0.0.1 for tests, scriptable per request.

`POST /v1/chat/completions` answers with the next behaviour of the script (then `default`):

    "good"            a JSON reply {"description": ...} describing the target of the request
    "plain_text"      the good description as plain text (a server ignoring response_format)
    "malformed_json"  a broken JSON reply
    "wrong_aus"       a JSON reply describing other AUs than the target
    "identity"        a good description with identity words in it
    "rate_limit"      429 with Retry-After (seconds in `retry_after`)
    "slow"            the good reply after `slow_s` seconds
    "error_500"       500
    "reject_format"   400 when the request carries response_format, else good
    "unauthorized"    401 (a wrong API key)
    "no_model"        404 (an unknown model)
    "html"            200 with an HTML page (a proxy's login page), not a chat completion
    a callable        f(request_body) -> Response

A request without a target block (the factory's preflight, "Reply with OK.") gets `ping` instead
("ok" by default, or any behaviour above) and is kept in `pings`, not `requests`.

The target is read from the JSON block after "TARGET:" in the last user message that has one, so
the server never shares code with the expander it tests. It writes its own descriptions with a
small fixed vocabulary (different from the grammar's).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from loopback_http import LoopbackHTTPServer, QuietHandler

AUS = (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26)
_PHRASES = {
    1: "raised inner brows",
    2: "raised outer brows",
    4: "lowered brows",
    5: "widened eyes",
    6: "raised cheeks",
    9: "wrinkled nose",
    12: "upturned lip corners",
    15: "downturned lip corners",
    17: "raised chin",
    20: "stretched lips",
    25: "parted lips",
    26: "dropped jaw",
}
_ADVERBS = {2: "slightly", 3: "clearly", 4: "strongly", 5: "extremely"}
_TARGET_RE = re.compile(r"TARGET:\s*```json\s*(\{.*?\})\s*```", re.S)


@dataclass
class Response:
    status: int = 200
    content: str | None = None  # the assistant message (status 200)
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    error: str = "error"
    html: str | None = None  # a 200 text/html body instead of a chat completion


def target_of(body: dict[str, Any]) -> dict[str, int]:
    """AU number -> intensity, read from the last user message that carries a target block."""
    for msg in reversed(body.get("messages", [])):
        if msg.get("role") == "user" and (m := _TARGET_RE.search(str(msg.get("content", "")))):
            t = json.loads(m.group(1))
            return {int(k[2:]): int(v) for k, v in t["au_intensity"].items()}
    raise ValueError("no TARGET block in the user messages")


def describe(target: dict[str, int]) -> str:
    items = [f"{_ADVERBS[min(v, 5)]} {_PHRASES[au]}" for au, v in target.items() if v >= 2]
    if not items:
        return "A calm face at rest, nothing moves."
    return "A face showing " + ", ".join(items) + "."


def wrong_description(target: dict[str, int]) -> str:
    absent = [au for au in AUS if target.get(au, 0) < 2][:3] or [20]
    return "A face showing " + ", ".join(f"strongly {_PHRASES[au]}" for au in absent) + "."


class FakeOpenAIServer(LoopbackHTTPServer):
    """An OpenAI-compatible server on an ephemeral loopback port; records every request body."""

    def __init__(self, default: str | Callable[[dict[str, Any]], Response] = "good", api_key: str | None = None):
        self.default = default
        #: when set, a request without `Authorization: Bearer <api_key>` gets a 401 as OpenAI answers it
        self.api_key = api_key
        self.refused_keys = 0
        self.script: deque[str | Callable[[dict[str, Any]], Response]] = deque()
        self.requests: list[dict[str, Any]] = []
        self.ping: str | Callable[[dict[str, Any]], Response] = "ok"
        self.pings: list[dict[str, Any]] = []
        self.retry_after = "1"
        self.slow_s = 2.0
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        super().__init__(self._handler_class())

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def push(self, *behaviours: str | Callable[[dict[str, Any]], Response]) -> None:
        with self._lock:
            self.script.extend(behaviours)

    # ------------------------------------------------------------------------------------------
    def respond(self, body: dict[str, Any]) -> Response:
        pinged = not any(
            m.get("role") == "user" and _TARGET_RE.search(str(m.get("content", ""))) for m in body.get("messages", [])
        )
        with self._lock:
            if pinged:
                self.pings.append(body)
                behaviour = self.ping
            else:
                self.requests.append(body)
                behaviour = self.script.popleft() if self.script else self.default
        if callable(behaviour):
            return behaviour(body)
        fixed = {
            "ok": Response(content="OK"),
            "unauthorized": Response(status=401, error="Incorrect API key provided"),
            "no_model": Response(status=404, error="The model `test-model` does not exist"),
            "html": Response(html="<html><body><h1>Please log in</h1></body></html>"),
            "error_500": Response(status=500, error="internal error"),
        }
        if behaviour in fixed:
            return fixed[behaviour]
        target = target_of(body)
        good = json.dumps({"description": describe(target)})
        if behaviour == "good":
            return Response(content=good)
        if behaviour == "plain_text":
            return Response(content=describe(target))
        if behaviour == "malformed_json":
            return Response(content='{"description": ')
        if behaviour == "wrong_aus":
            return Response(content=json.dumps({"description": wrong_description(target)}))
        if behaviour == "identity":
            return Response(content=json.dumps({"description": "A young woman; " + describe(target)}))
        if behaviour == "rate_limit":
            return Response(status=429, headers={"Retry-After": self.retry_after}, error="rate limited")
        if behaviour == "slow":
            return Response(content=good, delay_s=self.slow_s)
        if behaviour == "reject_format":
            if "response_format" in body:
                return Response(status=400, error="response_format is not supported")
            return Response(content=good)
        raise ValueError(f"unknown behaviour {behaviour!r}")

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    with server._lock:
                        server.refused_keys += 1
                    self._send(401, {"error": {"message": "Incorrect API key provided", "type": "test", "code": 401}})
                    return
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    r = server.respond(body)
                    if r.delay_s:
                        time.sleep(r.delay_s)
                finally:
                    with server._lock:
                        server.in_flight -= 1
                if r.status != 200:
                    self._send(r.status, {"error": {"message": r.error, "type": "test", "code": r.status}}, r.headers)
                    return
                if r.html is not None:
                    self._send_raw(200, r.html.encode(), "text/html")
                    return
                prompt_words = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
                completion_words = len((r.content or "").split())
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{len(server.requests)}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model", "test-model"),
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": r.content},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {
                            "prompt_tokens": prompt_words,
                            "completion_tokens": completion_words,
                            "total_tokens": prompt_words + completion_words,
                        },
                    },
                    r.headers,
                )

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                self._send_raw(status, json.dumps(payload).encode(), "application/json", headers)

            def _send_raw(self, status: int, data: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

        return Handler
