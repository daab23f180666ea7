"""The coordinator's metrics listener (127.0.0.1 by default): ``GET /metrics``, Prometheus text
answered from memory (no remote calls). ``readers`` may add read-only JSON routes under
``/api/v1/``; the coordinator adds none — its API, authenticated, is :mod:`broker.http.rest`.

The listener is bounded (issue 10): at most ``max_connections`` connections
are served at once (one thread each; more are closed at once), a request
must arrive whole within ``header_timeout_s``, and a connection that sends or
takes nothing for ``idle_timeout_s`` is closed. 4000 half-sent requests once
held 4029 threads until their client went away.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST

from broker.http.metrics import Exposition, MetricsBoard

__all__ = ["serve", "BrokerHttp", "HttpLimits"]

Reader = Callable[[], Any]  # returns JSON-ready data; raises on failure


@dataclass(frozen=True)
class HttpLimits:
    """What one client may hold of the listener. Scrapes and reads are small and quick."""

    max_connections: int = 32
    header_timeout_s: float = 10.0  # the whole request (a GET: line and headers)
    idle_timeout_s: float = 10.0  # any one read or write


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    limits = HttpLimits()

    def server_activate(self) -> None:
        super().server_activate()
        self._slots = threading.BoundedSemaphore(self.limits.max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: refused at once, no thread
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        return None  # a client that timed out or went away: nothing to report


class _DeadlineReader(io.RawIOBase):
    """Reads from the socket until a deadline; each read waits at most what is left (or the idle limit)."""

    def __init__(self, sock: socket.socket, limits: HttpLimits):
        self._sock = sock
        self._idle_s = limits.idle_timeout_s
        self._deadline = time.monotonic() + limits.header_timeout_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(min(left, self._idle_s))
        return self._sock.recv_into(buffer)


class _QuietHandler(WSGIRequestHandler):
    def setup(self) -> None:
        super().setup()
        self._limits: HttpLimits = self.server.limits  # type: ignore[attr-defined]
        self.rfile.close()  # the plain reader: replaced by one that keeps the deadline
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self._limits))

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        # The request is in; the answer's writes get the idle limit (not what was left of the deadline).
        self.connection.settimeout(self._limits.idle_timeout_s)
        return parsed

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        return None


class BrokerHttp:
    """The WSGI app: routes to the metrics exposition and the read API."""

    def __init__(self, board: MetricsBoard, readers: dict[str, Reader]):
        self._exposition = Exposition(board)  # cached until the board changes
        self._readers = readers

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if environ.get("REQUEST_METHOD", "GET") != "GET":
            return _reply(start_response, "405 Method Not Allowed", b"read-only\n", "text/plain")
        if path == "/metrics":
            return _reply(start_response, "200 OK", self._exposition.render(), CONTENT_TYPE_LATEST)
        if path.startswith("/api/v1/") and path[len("/api/v1/") :] in self._readers:
            try:
                body = json.dumps(self._readers[path[len("/api/v1/") :]](), default=str).encode()
            except Exception as exc:  # noqa: BLE001 - one clear line to the caller
                body = json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
                return _reply(start_response, "503 Service Unavailable", body, "application/json")
            return _reply(start_response, "200 OK", body, "application/json")
        return _reply(start_response, "404 Not Found", b"try /metrics or /api/v1/resources\n", "text/plain")


def _reply(start_response: Callable[..., Any], status: str, body: bytes, content_type: str) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


def serve(
    board: MetricsBoard, readers: dict[str, Reader], host: str, port: int, limits: HttpLimits | None = None
) -> tuple[Any, str]:
    """Start the listener in a daemon thread; returns the server and its base URL (no path)."""
    server_class = type("_BoundedServer", (_ThreadingServer,), {"limits": limits or HttpLimits()})
    server: Any = make_server(host, port, BrokerHttp(board, readers), server_class, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="merlin-http", daemon=True)
    thread.start()
    shown = f"[{host}]" if ":" in host else host
    return server, f"http://{shown}:{server.server_port}"
