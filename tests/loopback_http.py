"""The HTTP plumbing the tests' loopback servers share (tests/openai_server.py, tests/s3_fault_proxy.py)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from typing_extensions import Self


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 (keep-alive, as real servers speak it), logging nothing into pytest's output."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass


class LoopbackHTTPServer:
    """A ThreadingHTTPServer on an ephemeral 127.0.0.1 port, served from a daemon thread;
    `with` starts and stops it."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
