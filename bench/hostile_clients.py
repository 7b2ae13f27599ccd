"""The traffic of bench/serve_hostile.py: good callers and each kind of attacker, as functions that run in
threads of the benchmark until `Traffic.stop`, and record each answer's status by kind."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections import Counter

SOCKET_TIMEOUT_S = 30.0  # how long a client waits on its socket, s
#: What a slow-header connection sends, one byte a second (it never ends: X-Pad goes on).
SLOW_HEADER = b"POST /verify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Pad: " + b"a" * 4000
ABORT_EVERY_S = 0.2  # one aborted upload this often, s


class Traffic:
    """Answers by kind and status, and the good callers' latencies (s) by phase."""

    def __init__(self):
        self.lock, self.status, self.latency = threading.Lock(), {}, {"baseline": [], "attack": []}
        self.phase = "baseline"
        self.attacking = threading.Event()
        self.stop = threading.Event()

    def record(self, kind: str, status, latency: float | None = None) -> None:
        with self.lock:
            self.status.setdefault(kind, Counter())[str(status)] += 1
            if latency is not None:
                self.latency[self.phase].append(latency)


def _http_status(data: bytes) -> str:
    return data[9:12].decode() if data.startswith(b"HTTP/1.1 ") else ("closed" if not data else "other")


def raw_exchange(port: int, payload: bytes, read: bool = True) -> str:
    """Send raw bytes, return the answer's status ("closed": closed without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock:
        try:
            sock.sendall(payload)
            return _http_status(sock.recv(4096)) if read else "sent"
        except OSError:
            return "reset"


def good_client(url: str, pairs, traffic: Traffic, k: int) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=SOCKET_TIMEOUT_S) as c:
        n = k
        while not traffic.stop.is_set():
            a, b = pairs[n % len(pairs)]
            t0 = time.perf_counter()
            try:
                status = c.post("/verify", json={"image_a": a, "image_b": b}).status_code
            except httpx.HTTPError as err:
                status = type(err).__name__
            traffic.record("good /verify", status, time.perf_counter() - t0)
            n += 1


def large_image_client(url: str, images: list[str], small: str, traffic: Traffic) -> None:
    import httpx

    traffic.attacking.wait()
    with httpx.Client(base_url=url, timeout=SOCKET_TIMEOUT_S) as c:
        n = 0
        while not traffic.stop.is_set():
            kind = ("6300x6300 RGBA PNG", "8000x6000 JPEG")[n % 2]
            r = c.post("/verify", json={"image_a": images[n % 2], "image_b": small})
            traffic.record(kind, r.status_code)
            n += 1


def garbage_client(port: int, small: str, traffic: Traffic) -> None:
    rng = random.Random(26)
    traffic.attacking.wait()
    head = b"POST /verify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    bodies = {"malformed JSON": b'{"image_a": ', "NaN threshold": b'{"threshold": NaN}',
              "deep nesting": b"[" * 50_000 + b"]" * 50_000,
              "wrong types": json.dumps({"image_a": 5, "image_b": [small], "threshold": "x"}).encode()}
    n = 0
    while not traffic.stop.is_set():
        which = n % 6
        if which == 0:
            traffic.record("random bytes", raw_exchange(port, bytes(rng.getrandbits(8) for _ in range(300))))
        elif which == 1:
            traffic.record("1 GB Content-Length", raw_exchange(port, head + b"Content-Length: 1000000000\r\n\r\n"))
        else:
            name = list(bodies)[which - 2]
            body = bodies[name]
            traffic.record(name, raw_exchange(port, head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)))
        n += 1


def aborting_client(port: int, traffic: Traffic) -> None:
    traffic.attacking.wait()
    head = (b"POST /verify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 20000000\r\n\r\n")
    while not traffic.stop.is_set():
        traffic.record("aborted upload", raw_exchange(port, head + b" " * 1_000_000, read=False))
        time.sleep(ABORT_EVERY_S)


def chunked_client(port: int, traffic: Traffic) -> None:
    """A chunked body that never ends: refused (413) once over /verify's limit, while it streams."""
    traffic.attacking.wait()
    chunk = b" " * 1_000_000
    while not traffic.stop.is_set():
        with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock:
            try:
                sock.sendall(b"POST /verify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
                for _ in range(40):  # 40 MB, over the ~29 MB limit
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                status = _http_status(sock.recv(4096))
            except OSError:
                status = _http_status(_drain(sock))
        traffic.record("endless chunked body", status)


def _drain(sock: socket.socket) -> bytes:
    try:
        return sock.recv(4096)
    except OSError:
        return b""


def slow_clients(port: int, count: int, traffic: Traffic) -> None:
    """`count` connections trickling headers, count/5 trickling a body, one byte a second each; a connection the
    server closes is counted with the answer it got and how long it lived, then replaced."""
    traffic.attacking.wait()
    body_head = (b"POST /verify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000000\r\n\r\n")
    conns = []

    def opened(kind: str) -> dict:
        sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S)
        sock.setblocking(False)
        if kind == "slow body":
            sock.sendall(body_head)
        return {"sock": sock, "kind": kind, "sent": 0, "t0": time.monotonic()}

    conns = [opened("slow headers") for _ in range(count)] + [opened("slow body") for _ in range(count // 5)]
    while not traffic.stop.is_set():
        for k, c in enumerate(conns):
            answer = _poll(c)
            if answer is None:
                continue
            c["sock"].close()
            traffic.record(c["kind"], f"{answer} after {time.monotonic() - c['t0']:.0f} s")
            conns[k] = opened(c["kind"])
        time.sleep(1.0)
    for c in conns:
        c["sock"].close()


def _poll(c: dict) -> str | None:
    """Send the next byte; the server's answer if it closed the connection, None while it is open."""
    try:
        data = c["sock"].recv(4096)
        return _http_status(data)
    except BlockingIOError:
        pass
    except OSError:
        return "reset"
    byte = b" " if c["kind"] == "slow body" else SLOW_HEADER[c["sent"] % len(SLOW_HEADER):][:1]
    try:
        c["sent"] += c["sock"].send(byte)
    except BlockingIOError:
        pass
    except OSError:
        return "reset"
    return None
