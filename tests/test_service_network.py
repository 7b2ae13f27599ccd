"""facetrain.serve on a real socket (issue 26, items 4 and 7): slow headers and bodies are timed out, a chunked
body over its endpoint's limit is refused while it streams, aborted uploads are one quiet line, the connection
cap holds, and the Host header is checked. A real `python -m facetrain.serve` of the tiny graph
(tests/tiny_onnx.py) on a free loopback port, with short deadlines so that each test takes seconds."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from helpers import free_port, running_service
from tiny_onnx import write_tiny_onnx

httpx = pytest.importorskip("httpx", reason='needs the serve extra: pip install -e ".[serve]"')
pytest.importorskip("fastapi", reason='needs the serve extra: pip install -e ".[serve]"')

START_TIMEOUT_S = 60
HEADER_TIMEOUT_S = 1.0  # the test server's deadlines, short so the slow-client tests take seconds
BODY_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_onnx(tmp_path_factory.mktemp("tiny") / "verifier.onnx")


# ----------------------------------------------------------------------------------------------------------
# Items 4 and 7 on a real server: slow clients, aborted uploads, the connection cap, the Host header


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = ["--model", tiny, "--port", port, "--header-timeout", HEADER_TIMEOUT_S, "--body-timeout", BODY_TIMEOUT_S,
            "--max-connections", MAX_CONNECTIONS]
    with running_service(args, log, START_TIMEOUT_S) as (_, url):
        yield {"url": url, "port": port, "log": log}


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def test_slow_headers_and_slow_bodies_are_timed_out(server):
    port = server["port"]
    idle, trickle = _connect(port), _connect(port)
    t0 = time.monotonic()
    for byte in b"POST /verify":  # one byte every 0.1 s for 0.8 s, never finishing the headers
        trickle.sendall(bytes([byte]))
        time.sleep(HEADER_TIMEOUT_S / 10)
        if time.monotonic() - t0 > 0.8 * HEADER_TIMEOUT_S:
            break
    answer = _read_all(trickle)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert _read_all(idle) == b""  # closed without a word: it never started a request
    assert time.monotonic() - t0 < HEADER_TIMEOUT_S + 3

    slow = _connect(port)
    slow.sendall(b"POST /verify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"image_a\": ")
    t0 = time.monotonic()
    answer = _read_all(slow)
    assert answer.startswith(b"HTTP/1.1 408") and b"send it faster" in answer, answer
    assert BODY_TIMEOUT_S - 0.5 < time.monotonic() - t0 < BODY_TIMEOUT_S + 3
    assert httpx.get(server["url"] + "/health").json()["rejected"]["408"] >= 1


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(server):
    limit = httpx.get(server["url"] + "/health").json()["limits"]["max_body_bytes"]["/identify"]
    sock = _connect(server["port"])
    sock.sendall(b"POST /identify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b" " * 1_000_000
    try:
        for _ in range(limit // len(chunk) + 2):  # just over the limit, and the body never ends
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    except OSError:  # the server answered and closed while this was still sending: read its answer
        pass
    answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 413") and b"endpoint's limit" in answer, answer[:300]


def test_aborted_uploads_are_one_quiet_line_at_most(server):
    """5 aborted uploads: one line (then at most one per ABORT_LOG_EVERY_S), no traceback; /health counts all."""
    before = server["log"].read_text().count("\n")
    for _ in range(5):
        sock = _connect(server["port"])
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n" + b" " * 5000)
        time.sleep(0.1)
        sock.close()
    time.sleep(0.5)
    log = server["log"].read_text()
    new = log.splitlines()[before:]
    assert "Traceback" not in log and len(new) == 1 and "aborted upload: /embed: client closed" in new[0], new
    assert httpx.get(server["url"] + "/health").json()["rejected"]["aborted"] == 5  # counted, not logged


def test_connection_cap_and_host_header_on_the_real_server(server):
    url, port = server["url"], server["port"]
    assert httpx.get(url + "/health", headers={"host": "attacker.example"}).status_code == 400
    assert httpx.get(url + "/health", headers={"host": f"localhost:{port}"}).status_code == 200
    health = httpx.get(url + "/health").json()
    assert health["limits"]["max_connections"] == MAX_CONNECTIONS
    assert health["limits"]["header_timeout_s"] == HEADER_TIMEOUT_S
    held = [_connect(port) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        assert httpx.get(url + "/health").status_code == 503  # over the cap: refused, not queued
        held += [_connect(port) for _ in range(MAX_CONNECTIONS)]  # twice the cap: the next one is closed at once
        extra, t0 = _connect(port), time.monotonic()
        assert _read_all(extra) == b"" and time.monotonic() - t0 < HEADER_TIMEOUT_S / 2
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(url + "/health").status_code == 200
