"""Slow clients against a real uvicorn server: headers and bodies have deadlines, connections a cap."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from bptvlm.launch import free_port
from bptvlm.server.app import build_service, create_app
from bptvlm.server.config import Settings
from bptvlm.server.connections import uvicorn_options

SETTINGS = Settings(device="cpu", api_keys=("tok",), header_timeout_s=0.5, body_timeout_s=0.5, max_connections=6,
                    ready_probe_s=0)


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    port = free_port()
    config = uvicorn.Config(create_app(SETTINGS, service=build_service(SETTINGS)), host="127.0.0.1", port=port,
                            log_level="warning", **uvicorn_options(SETTINGS))
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield port
    srv.should_exit = True
    thread.join(timeout=10)


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing, or None if it kept the connection open ``seconds``."""
    sock.settimeout(seconds)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except (TimeoutError, socket.timeout):
        return None
    except ConnectionResetError:
        pass
    return got


def _received_within(sock: socket.socket, seconds: float) -> bytes:
    """Whatever the server sent within ``seconds`` (closed or not)."""
    got, end = b"", time.monotonic() + seconds
    while time.monotonic() < end:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, socket.timeout, ConnectionResetError):
            break
        if not chunk:
            break
        got += chunk
    return got


def test_headers_trickled_past_the_deadline_are_cut_off(server: int) -> None:
    sock = _connect(server)
    start = time.monotonic()
    for piece in (b"GET /v2/hea", b"lth/live HTTP/1.1\r\n", b"Host: x\r\n"):  # never the final blank line
        sock.sendall(piece)
        time.sleep(0.2)
    assert _closed_within(sock, 3.0) == b""
    assert time.monotonic() - start < 2.5


def test_a_trickled_body_gets_408(server: int) -> None:
    sock = _connect(server)
    sock.sendall(b"POST /v2/models/clip/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"inputs\": ")
    reply = _received_within(sock, 2.0)
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"did not arrive within 0.5 s" in reply


def test_connections_past_the_cap_are_closed_and_health_still_answers(server: int) -> None:
    idle = [_connect(server) for _ in range(SETTINGS.max_connections)]
    extra = _connect(server)
    assert _closed_within(extra, 0.3) == b""  # closed at once, well before the 0.5 s header deadline
    for s in idle:
        s.close()
    time.sleep(0.1)
    ok = _connect(server)
    ok.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (_closed_within(ok, 3.0) or b"").startswith(b"HTTP/1.1 200")


def test_a_complete_request_is_not_cut_by_the_header_deadline(server: int) -> None:
    sock = _connect(server)
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.8)  # past the header deadline, but the request was whole: answered, then kept alive
    sock.settimeout(2)
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    sock.close()
