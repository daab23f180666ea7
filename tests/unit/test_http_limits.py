"""The HTTP listener is bounded: connections, the time a request may take, idle sockets (issue 10, item 10)."""

from __future__ import annotations

import socket
import threading
import urllib.request

import pytest

from broker.http.api import HttpLimits, serve
from broker.http.metrics import MetricsBoard

LIMITS = HttpLimits(max_connections=4, header_timeout_s=1.0, idle_timeout_s=1.0)


@pytest.fixture
def listener():
    board = MetricsBoard()
    board.set_keys(["lane"], "test")
    server, base = serve(board, {"status": lambda: {"ok": True}}, "127.0.0.1", 0, LIMITS)
    yield server, base
    server.shutdown()
    server.server_close()


def _half_sent(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # the headers never end
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    """Blocks until the server closes (or resets) the connection; False if it answers instead."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


def test_half_sent_requests_are_closed_after_the_header_timeout(listener):
    _, base = listener
    held = [_half_sent(base) for _ in range(LIMITS.max_connections)]
    assert all(_closed_by_server(sock) for sock in held)
    with urllib.request.urlopen(f"{base}/api/v1/status", timeout=30) as answer:
        assert answer.status == 200


def test_a_trickle_of_bytes_does_not_keep_a_request_alive(listener):
    _, base = listener
    sock = _half_sent(base)
    stop = threading.Event()

    def trickle() -> None:  # a byte well within the idle limit, forever
        while not stop.wait(LIMITS.idle_timeout_s / 4):
            try:
                sock.send(b"X")
            except OSError:
                return

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    try:
        assert _closed_by_server(sock)
    finally:
        stop.set()
        feeder.join()


def test_connections_beyond_the_limit_are_refused_without_a_thread_each(listener):
    _, base = listener
    before = threading.active_count()
    held = [_half_sent(base) for _ in range(LIMITS.max_connections)]
    extra = [_half_sent(base) for _ in range(12)]
    # Every extra one is closed at once, while the held ones still wait for their headers.
    assert all(_closed_by_server(sock) for sock in extra)
    assert threading.active_count() <= before + LIMITS.max_connections
    assert all(_closed_by_server(sock) for sock in held)


def test_an_idle_connection_that_sent_nothing_is_closed(listener):
    _, base = listener
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    assert _closed_by_server(sock)
