"""facetrain.serve on a network (issue 26, items 2-5 and 7): the decode budget, per-endpoint body limits, slow and
aborting clients, hostile JSON (a seeded fuzz over every endpoint: no 5xx), and what a client can learn.

Fast and self-contained: the model is a tiny graph written with onnx.helper (tests/tiny_onnx.py, no torch, no
shared data); these tests run the app in-process (FastAPI's TestClient); tests/test_service_network.py runs a
real `python -m facetrain.serve` for what needs sockets (slow clients, aborts, the connection cap)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_onnx import write_tiny_onnx

httpx = pytest.importorskip("httpx", reason='needs the serve extra: pip install -e ".[serve]"')
pytest.importorskip("fastapi", reason='needs the serve extra: pip install -e ".[serve]"')

from fastapi.testclient import TestClient  # noqa: E402

from facetrain.data.faceset import scan_identity_folder  # noqa: E402
from facetrain.deploy import app as app_module  # noqa: E402
from facetrain.deploy.app import build_app  # noqa: E402
from facetrain.deploy.gallery import enrol  # noqa: E402
from facetrain.deploy.http_input import default_allowed_hosts, host_name  # noqa: E402
from facetrain.deploy.limits import BodyBudget, Limits, RequestError, fit_decode  # noqa: E402
from facetrain.deploy.onnx_embedder import OnnxEmbedder  # noqa: E402
from facetrain.errors import UserError  # noqa: E402


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def face(seed: int) -> bytes:
    """A 36 x 40 PNG of 2 x 2 flat colour blocks (a few hundred bytes; the tiny model tells seeds apart)."""
    blocks = np.random.default_rng(seed).integers(0, 256, (2, 2, 3), dtype=np.uint8)
    return png(np.kron(blocks, np.ones((20, 18, 1), dtype=np.uint8)))


def claiming(fmt: str, width: int, height: int, mode: str = "RGB") -> bytes:
    """A small image file whose header claims width x height: what a client can send in a few hundred bytes.
    The service must refuse it on the header (decoding it would fail: the pixel data is for 8 x 8)."""
    buf = io.BytesIO()
    Image.new(mode, (8, 8)).save(buf, format=fmt)
    data = bytearray(buf.getvalue())
    if fmt == "PNG":  # IHDR: length, type, width, height, ..., CRC over type + data
        data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
        data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    else:  # JPEG: the SOF0 marker's height, width
        at = data.index(b"\xff\xc0") + 5
        data[at:at + 4] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_onnx(tmp_path_factory.mktemp("tiny") / "verifier.onnx")


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gallery")
    for k, name in enumerate(("alice", "bob", "carol")):
        (root / name).mkdir()
        for j in range(2):
            (root / name / f"{j}.png").write_bytes(face(10 * k + j))
    return root


@pytest.fixture(scope="module")
def embedder(tiny) -> OnnxEmbedder:
    return OnnxEmbedder.load(tiny, num_workers=0)


def client_for(embedder, gallery_dir=None, limits=None, **kw) -> TestClient:
    gallery = None if gallery_dir is None else enrol(embedder, gallery_dir, scan_identity_folder(gallery_dir, "g"))
    return TestClient(build_app(embedder, gallery, limits, **kw))


@pytest.fixture(scope="module")
def app_client(embedder, gallery_dir):
    with client_for(embedder, gallery_dir) as c:
        yield c


# ----------------------------------------------------------------------------------------------------------
# Item 2: the decode budget


def test_decoded_bytes_are_budgeted_and_large_jpegs_decode_small(app_client, embedder):
    rgba = claiming("PNG", 4000, 4000, "RGBA")  # 16 MP: under the pixel limit, 64 MB decoded
    r = app_client.post("/embed", json={"image": b64(rgba)})
    assert r.status_code == 413 and "decodes to 64,000,000 bytes" in r.json()["error"], r.text
    wide = claiming("PNG", 6300, 6300, "RGBA")  # the 170 KB one-colour PNG: refused on its header
    r = app_client.post("/verify", json={"image_a": b64(wide), "image_b": b64(face(1))})
    assert r.status_code == 413 and "pixels is over the limit of 16,777,216" in r.json()["error"], r.text
    huge = claiming("JPEG", 60000, 60000)  # even 1/8 scale (56 MP) would be over (PIL's bomb check says so first)
    r = app_client.post("/embed", json={"image": b64(huge)})
    assert r.status_code == 413 and "pixels" in r.json()["error"], r.text

    big = io.BytesIO()  # 48 MP: over the pixel limit, decoded at 1/2 scale (12 MP) by JPEG draft mode
    Image.new("L", (8000, 6000), 128).save(big, format="JPEG", quality=50)
    r = app_client.post("/embed", json={"image": b64(big.getvalue())})
    assert r.status_code == 200, r.text
    assert fit_decode(Image.open(big), "big", Limits()).size == (4000, 3000)

    limits = app_client.get("/health").json()["limits"]
    assert limits["max_pixels"] == 4096 * 4096 and limits["max_decoded_bytes"] == 4096 * 4096 * 3
    assert limits["decode_workers"] >= 1 and limits["max_body_bytes"]["/verify"] < limits["max_body_bytes"]["/embed"]


def test_concurrent_decodes_are_bounded(embedder, monkeypatch):
    """16 concurrent requests, 2 decode workers: at most 2 images decode at a time (the thread pool of 40
    would run them all at once)."""
    active, peak, lock = [0], [0], threading.Lock()
    real = embedder.prepare

    def slow_prepare(*args, **kw):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return real(*args, **kw)

    monkeypatch.setattr(embedder, "prepare", slow_prepare)
    app = build_app(embedder, limits=Limits(decode_workers=2))

    async def run() -> list[int]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://x") as c:
                rs = await asyncio.gather(*[c.post("/embed", json={"image": b64(face(k))}) for k in range(16)])
        return [r.status_code for r in rs]

    assert asyncio.run(run()) == [200] * 16
    assert 1 <= peak[0] <= 2


# ----------------------------------------------------------------------------------------------------------
# Item 3: body limits per endpoint, JSON off the event loop


def test_body_limit_is_per_endpoint_and_json_is_parsed_off_the_loop(embedder, gallery_dir, monkeypatch):
    limits = Limits(max_image_bytes=1000, max_images=16)
    threads = []
    real_parse = app_module.parse_json

    def parse(body):
        threads.append(threading.current_thread().name)
        return real_parse(body)

    monkeypatch.setattr(app_module, "parse_json", parse)
    with client_for(embedder, gallery_dir, limits) as c:
        padding = " " * (limits.body_limit(1) + 10)  # fits /embed (16 images), not /identify (1)
        body = ('{"image": "' + b64(face(0)) + '"' + padding + "}").encode()
        r = c.post("/identify", content=iter([body[:5000], body[5000:]]), headers={"content-type": "application/json"})
        assert r.status_code == 413 and f"limit of {limits.body_limit(1):,}" in r.json()["error"], r.text
        assert r.headers["connection"] == "close"
        r = c.post("/embed", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
    assert threads and all(name.startswith("facetrain-decode") for name in threads)


def test_limit_options_are_checked_before_the_model_loads(tiny):
    from facetrain import serve

    with pytest.raises(UserError, match="--max-inflight-bytes: 10 is less than the largest request body"):
        serve.main(["--model", str(tiny), "--max-inflight-bytes", "10"])
    with pytest.raises(UserError, match="--header-timeout: must be >= 0.1, got 0"):
        serve.main(["--model", str(tiny), "--header-timeout", "0"])


def test_bodies_held_at_once_are_budgeted():
    budget = BodyBudget(3000)
    with budget.hold() as first:
        first.add(2000)
        with budget.hold() as second:
            second.add(1000)  # exactly the budget
            with pytest.raises(RequestError, match="server busy") as err:
                budget.hold().add(1)
            assert err.value.status == 503 and err.value.close
        assert budget.used == 2000
    assert budget.used == 0


# ----------------------------------------------------------------------------------------------------------
# Item 5: hostile JSON, and a seeded fuzz over every endpoint


def test_non_finite_numbers_deep_nesting_and_wrong_types_are_one_line_4xx(app_client):
    img = b64(face(3))
    pair, one = f'{{"image_a": "{img}", "image_b": "{img}", ', f'{{"image": "{img}", '
    raw = [
        ("/verify", pair + '"threshold": NaN}', "NaN is not a number"),
        ("/verify", pair + '"threshold": Infinity}', "Infinity"),
        ("/verify", pair + '"threshold": 1e999}', "out of range"),
        ("/identify", one + '"top_k": -Infinity}', "-Infinity"),
        ("/embed", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("/embed", '{"images": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
        ("/identify", one + '"top_k": 2.5}', "'top_k' must be an integer"),
        ("/identify", one + '"top_k": ' + "9" * 30 + "}", None),
        ("/verify", pair + '"threshold": [0.5]}', "finite number"),
        ("/embed", '{"images": [{"a": 1}]}', "must be a base64 string"),
        ("/embed", b'{"image": "\xff\xfe"}', "malformed JSON"),
        ("/embed", '{"image": 1' + "0" * 5000 + "}", "malformed JSON"),
    ]
    for path, body, words in raw:
        r = app_client.post(path, content=body, headers={"content-type": "application/json"})
        if words is None:
            assert r.status_code == 200, r.text
            continue
        assert r.status_code == 422, (path, body[:60], r.status_code, r.text[:300])
        error = r.json()["error"]
        assert words in error and "\n" not in error, (path, error)


def _fuzz_value(rng, depth: int = 0):
    kind = rng.integers(0, 9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return bool(rng.integers(0, 2))
    if kind == 2:
        return int(rng.integers(-(2**62), 2**62)) * (10**20 if rng.random() < 0.5 else 1)
    if kind == 3:
        return float(rng.normal()) * 10.0 ** int(rng.integers(-5, 300))
    if kind == 4:
        return "".join(chr(int(c)) for c in rng.integers(1, 0x2FF, rng.integers(0, 40)))
    if kind == 5:
        return b64(bytes(rng.integers(0, 256, rng.integers(0, 300), dtype=np.uint8)))
    if kind in (6, 7):
        return [_fuzz_value(rng, depth + 1) for _ in range(rng.integers(0, 4))]
    return {str(rng.integers(0, 5)): _fuzz_value(rng, depth + 1) for _ in range(rng.integers(0, 4))}


def _fuzz_request(rng, good: dict) -> dict:
    """One request: a good body with fields replaced by random values, or raw bytes, or the wrong type."""
    path = str(rng.choice(["/verify", "/embed", "/identify", "/health", "/nowhere"]))
    body = {k: v for k, v in good[path].items()} if path in good else {}
    for key in list(body) + ["threshold", "top_k", "images", "image", "image_a"]:
        if rng.random() < 0.3:
            body[key] = _fuzz_value(rng)
    form = rng.integers(0, 6)
    if form == 0:
        content = bytes(rng.integers(0, 256, rng.integers(0, 200), dtype=np.uint8))
    elif form == 1:  # a field's value replaced by what JSON cannot hold, or nests too deep, or a cut
        key = str(rng.choice(["threshold", "top_k", "image", "images", "image_a"]))
        raw = str(rng.choice(["NaN", "-Infinity", "Infinity", "1e400", "[" * 3000 + "]" * 3000, '"\\ud800"']))
        content = json.dumps({**body, key: "@RAW@"}).replace('"@RAW@"', raw).encode()
        if rng.random() < 0.2:
            content = content[:int(rng.integers(0, len(content) + 1))]
    else:
        content = json.dumps(body).encode()
    ctype = str(rng.choice(["application/json", "application/json; charset=utf-8", "text/plain", ""]))
    method = str(rng.choice(["POST", "POST", "POST", "GET", "PUT"]))
    return {"method": method, "url": path, "content": content, "headers": {"content-type": ctype} if ctype else {}}


def test_fuzz_every_endpoint_gets_no_5xx(app_client):
    """Bounded: 400 seeded requests or 40 s, whichever comes first; every answer is < 500 with one line."""
    rng = np.random.default_rng(26)
    img = b64(face(5))
    good = {"/verify": {"image_a": img, "image_b": img, "threshold": 0.5}, "/embed": {"images": [img, img]},
            "/identify": {"image": img, "top_k": 2}}
    deadline, seen = time.monotonic() + 40, {}
    for k in range(400):
        if time.monotonic() > deadline:
            break
        req = _fuzz_request(rng, good)
        r = app_client.request(**req)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (k, req["method"], req["url"], req["content"][:200], r.text[:300])
        if r.status_code >= 400:
            error = r.json()["error"]
            assert "\n" not in error and "Traceback" not in error, error
    assert sum(seen.values()) >= 100 and 200 in seen and 422 in seen, seen


# ----------------------------------------------------------------------------------------------------------
# Item 7: what a client learns


def test_health_and_identify_show_no_server_path_and_hosts_are_allow_listed(app_client, tiny, gallery_dir, embedder):
    health = app_client.get("/health")
    assert health.json()["model"] == "verifier.onnx"
    assert health.json()["gallery"] == {"images": 6, "identities": 3, "left_out": 0}
    got = app_client.post("/identify", json={"image": b64(face(0)), "top_k": 3})
    assert got.status_code == 200
    for text in (health.text, got.text):
        assert str(tiny.parent) not in text and str(gallery_dir) not in text
    matches = got.json()["matches"]
    assert matches[0] == {**matches[0], "identity": "alice", "image": "alice/0.png"}

    assert default_allowed_hosts("127.0.0.1") == ["127.0.0.1", "::1", "localhost"]
    assert default_allowed_hosts("0.0.0.0") == ["*"]
    assert host_name("[::1]:8000") == "::1" and host_name("LocalHost:80") == "localhost"
    with client_for(embedder, allowed_hosts=["localhost", "127.0.0.1"]) as c:
        r = c.get("/health")  # TestClient sends Host: testserver, as a rebound DNS name would reach us
        assert r.status_code == 400 and "--allowed-hosts" in r.json()["error"]
        assert c.get("/health", headers={"host": "localhost:8000"}).status_code == 200
