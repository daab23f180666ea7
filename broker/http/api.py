"""The coordinator's HTTP listener (127.0.0.1 by default): Prometheus metrics and a read-only API.

``GET /metrics``                Prometheus text, answered from memory (no remote calls)
``GET /api/v1/resources``      what ``resources()`` returns, as JSON (never a lease id)
``GET /api/v1/status``         what ``status()`` returns, as JSON

The read API exists for speed: ``merlin ray resources list`` reads it
without importing Ray (importing Ray alone costs about 0.4 s here). It only
reads; every change goes through Ray, which authenticates callers. The
coordinator records the URLs in ``broker.json`` in the state dir.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST

from broker.http.metrics import Exposition, MetricsBoard

__all__ = ["serve", "BrokerHttp"]

Reader = Callable[[], Any]  # returns JSON-ready data; raises on failure


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
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


def serve(board: MetricsBoard, readers: dict[str, Reader], host: str, port: int) -> tuple[Any, str]:
    """Start the listener in a daemon thread; returns the server and its base URL (no path)."""
    server = make_server(host, port, BrokerHttp(board, readers), _ThreadingServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="merlin-http", daemon=True)
    thread.start()
    shown = f"[{host}]" if ":" in host else host
    return server, f"http://{shown}:{server.server_port}"
