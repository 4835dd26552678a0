"""A loopback reverse proxy in front of the moto S3 server that fails chosen write requests, the
way a real object store sheds load: 503 SlowDown, 500 InternalError, or a connection reset.

    with S3FaultProxy(moto_url) as proxy:
        proxy.push("slowdown", "partNumber=1")  # the first upload of part 1 gets 503 SlowDown
        proxy.push("error_500", "?uploadId=")   # then the first completion of a multipart upload: 500
        proxy.push("reset", ".parquet")         # then the first parquet PUT: the connection is reset
        env["AWS_ENDPOINT_URL"] = proxy.url

A write request (PUT or POST: object and part uploads, multipart create and complete) takes the
first fault still in the script whose text is in its path ("" matches any), else it passes; other
requests always pass. Passed requests are forwarded to moto byte for byte (moto does not check
signatures). `faults` records what was answered, as (fault, method, path); `requests`, every request
as (method, path), for counting what a build asks of the store (bench/bench_orchestration.py).
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

from loopback_http import LoopbackHTTPServer, QuietHandler


FAULTS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "error_500": (500, "InternalError", "We encountered an internal error. Please try again."),
}
#: Hop-by-hop headers a proxy does not pass on.
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class S3FaultProxy(LoopbackHTTPServer):
    """A reverse proxy on an ephemeral loopback port, forwarding to `upstream`."""

    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.script: list[tuple[str, str]] = []  # (fault, text of the path it waits for)
        self.faults: list[tuple[str, str, str]] = []
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        super().__init__(self._handler())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def push(self, fault: str, match: str = "") -> None:
        if fault not in (*FAULTS, "reset"):
            raise ValueError(f"unknown fault {fault!r}")
        with self._lock:
            self.script.append((fault, match))

    def _next_fault(self, method: str, path: str) -> str | None:
        if method not in ("PUT", "POST"):
            return None
        with self._lock:
            for i, (fault, match) in enumerate(self.script):
                if match in path:
                    del self.script[i]
                    self.faults.append((fault, method, path))
                    return fault
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(QuietHandler):
            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _any(self) -> None:
                body = self._body()
                with proxy._lock:
                    proxy.requests.append((self.command, self.path))
                fault = proxy._next_fault(self.command, self.path)
                if fault == "reset":  # RST instead of an answer: what a dropped connection looks like
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                if fault is not None:
                    status, code, message = FAULTS[fault]
                    xml = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
                    data = f'<?xml version="1.0" encoding="UTF-8"?>{xml}'.encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    head = self.command == "HEAD"  # its Content-Length is the object's size: passed as is
                    for k, v in resp.getheaders():
                        if k.lower() not in HOP and (head or k.lower() != "content-length"):
                            self.send_header(k, v)
                    if not head:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        return Handler
