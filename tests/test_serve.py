"""facetrain.serve: a real server started on loopback (a free port) as a subprocess, a real HTTP client (httpx).
Answers equal the offline ones (`verify --backend onnxruntime`, `OnnxEmbedder.embed`, `identify`); bad requests
get 413 / 415 / 422 / 404 with one line and no traceback; 8 concurrent clients x 50 requests get no error and
every answer equals the offline one, and the server batched their images together."""

from __future__ import annotations

import base64
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers import FACES, NO_SHARED_REASON, free_port, running_service
from PIL import Image
from test_export import ATT, _fresh_accelerate_state, att_paths, trained_bundle, trained_export  # noqa: F401

httpx = pytest.importorskip("httpx", reason='needs the serve extra: pip install -e ".[serve]"')
pytest.importorskip("fastapi", reason='needs the serve extra: pip install -e ".[serve]"')

from facetrain import identify, serve, verify  # noqa: E402
from facetrain.deploy.app import build_app  # noqa: E402
from facetrain.deploy.onnx_embedder import OnnxEmbedder  # noqa: E402
from facetrain.deploy.server import listen, load_model  # noqa: E402
from facetrain.errors import UserError  # noqa: E402

pytestmark = [pytest.mark.faces, pytest.mark.skipif(not FACES.is_dir(), reason=NO_SHARED_REASON)]

MAX_IMAGE_BYTES = 200_000
MAX_PIXELS = 1_000_000
START_TIMEOUT_S = 180  # a loaded 2-core machine: imports + enrolling 400 gallery images


def b64(path_or_bytes) -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return base64.b64encode(data).decode()


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    return trained_bundle(tmp_path_factory)


@pytest.fixture(scope="session")
def trained_onnx(tmp_path_factory) -> Path:
    return trained_export(tmp_path_factory)


@pytest.fixture(scope="module")
def server(trained_onnx, tmp_path_factory):
    """The exported model served with a gallery (the AT&T faces) and small limits, on 127.0.0.1."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = ["--model", trained_onnx, "--host", "127.0.0.1", "--port", free_port(), "--gallery", ATT,
            "--max-image-bytes", MAX_IMAGE_BYTES, "--max-pixels", MAX_PIXELS, "--max-batch", "32",
            "--batch-window-ms", "5"]
    with running_service(args, log, START_TIMEOUT_S) as (proc, url):
        yield {"url": url, "log": log, "proc": proc}


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server["url"], timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def offline(trained_onnx):
    return OnnxEmbedder.load(trained_onnx, num_workers=0)


def test_answers_equal_the_offline_ones(client, offline, trained_onnx, capsys):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == trained_onnx.name and health["flip"] is True
    assert health["threshold"] == offline.meta["threshold"] and health["threshold_far"] == offline.meta["threshold_far"]
    assert health["gallery"] == {"images": 400, "identities": 40, "left_out": 0}  # no server path (issue 26, item 7)

    a, b, c = att_paths(3, seed=11)
    same_person = next(str(p) for p in sorted(Path(a).parent.glob("*.png")) if str(p) != a)
    for x, y in ((a, b), (a, same_person)):
        got = client.post("/verify", json={"image_a": b64(x), "image_b": b64(y)})
        assert got.status_code == 200, got.text
        got = got.json()
        want = verify.verify(str(trained_onnx), x, y, backend="onnxruntime")
        assert abs(got["similarity"] - want["similarity"]) < 1e-5
        assert got["same"] == want["same"] and got["threshold"] == want["threshold"]
        assert got["threshold_far"] == want["threshold_far"] and got["threshold_source"] == "model"
        assert got["faces"] == [None, None] and want["faces"] is None  # no alignment recipe: embedded as they are
    forced = client.post("/verify", json={"image_a": b64(a), "image_b": b64(b), "threshold": -1.0}).json()
    assert forced["same"] is True and forced["threshold"] == -1.0 and forced["threshold_far"] is None

    got = client.post("/embed", json={"images": [b64(p) for p in (a, b, c)]}).json()
    assert got["dim"] == 32
    assert np.abs(np.array(got["embeddings"]) - offline.embed([a, b, c])).max() < 1e-5
    single = client.post("/embed", json={"image": b64(c)}).json()["embeddings"]
    assert np.abs(np.array(single) - offline.embed([c])).max() < 1e-5

    got = client.post("/identify", json={"image": b64(c), "top_k": 3}).json()
    capsys.readouterr()
    assert identify.main(["--model", str(trained_onnx), "--backend", "onnxruntime", "--gallery", str(ATT),
                          "--no-cache", "--top-k", "3", "--json", "--num-workers", "0", c]) == 0
    want = json.loads(capsys.readouterr().out)["probes"][0]
    assert [m["identity"] for m in got["matches"]] == [m["identity"] for m in want["matches"]]
    assert [m["image"] for m in got["matches"]] == [os.path.relpath(m["image"], ATT) for m in want["matches"]]
    assert np.allclose([m["score"] for m in got["matches"]], [m["score"] for m in want["matches"]], atol=1e-5)
    assert got["match"] == want["match"]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_requests_get_a_4xx_with_one_line(client, server):
    face = b64(att_paths(1)[0])
    noise = _png(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8))  # ~270 KB
    assert len(noise) > MAX_IMAGE_BYTES
    wide = _png(np.zeros((1000, 1200), dtype=np.uint8))  # a few KB, 1.2 MP
    assert len(wide) < MAX_IMAGE_BYTES
    truncated = Path(att_paths(1)[0]).read_bytes()[:200]
    cases = [
        (413, "/verify", {"json": {"image_a": b64(noise), "image_b": face}}, "over the limit"),
        (413, "/embed", {"json": {"image": b64(wide)}}, "pixels is over the limit"),
        (413, "/embed", {"content": b"{" + b" " * 6_000_000 + b"}", "headers": {"content-type": "application/json"}},
         "request body"),
        (413, "/embed", {"json": {"images": [face] * 17}}, "over the limit of 16"),
        (415, "/verify", {"content": b"image_a=1", "headers": {"content-type": "text/plain"}}, "send JSON"),
        (415, "/verify", {"json": {"image_a": b64(b"this is not an image"), "image_b": face}}, "not an image"),
        (415, "/embed", {"json": {"image": b64(truncated)}}, "cannot decode image"),
        (422, "/verify", {"content": b'{"image_a": ', "headers": {"content-type": "application/json"}},
         "malformed JSON"),
        (422, "/verify", {"json": {"image_a": face}}, "missing field 'image_b'"),
        (422, "/verify", {"json": {"image_a": face, "image_b": "@@not base64@@"}}, "not valid base64"),
        (422, "/verify", {"json": {"image_a": face, "image_b": 5}}, "must be a base64 string"),
        (422, "/verify", {"json": {"image_a": face, "image_b": face, "threshold": "high"}}, "must be a finite number"),
        (422, "/identify", {"json": {"image": face, "top_k": 0}}, "top_k"),
        (422, "/embed", {"json": [face]}, "expected a JSON object"),
        (422, "/embed", {"json": {"images": []}}, "non-empty list"),
        (404, "/nowhere", {"json": {}}, "Not Found"),
    ]
    for status, path, kwargs, words in cases:
        r = client.post(path, **kwargs)
        assert r.status_code == status, (path, words, r.status_code, r.text[:300])
        error = r.json()["error"]
        assert words in error and "\n" not in error and "Traceback" not in error, (path, error)
    assert client.get("/verify").status_code == 405
    assert client.get("/health").json()["status"] == "ok"  # still serving
    assert "Traceback" not in server["log"].read_text()


def test_load_8_clients_x_50_requests_all_equal_offline(client, server, offline):
    """Bounded: 400 requests on loopback, each with a 60 s timeout."""
    files = att_paths(40, seed=5)
    encoded = [b64(p) for p in files]
    emb = offline.embed(files).astype(np.float64)
    threshold = offline.meta["threshold"]
    before = client.get("/health").json()["batching"]
    rng = np.random.default_rng(3)
    plan = rng.integers(0, len(files), (8, 50, 2))

    def worker(k: int) -> list[tuple]:
        out = []
        with httpx.Client(base_url=server["url"], timeout=60) as c:
            for i, j in plan[k]:
                r = c.post("/verify", json={"image_a": encoded[i], "image_b": encoded[j]})
                out.append((int(i), int(j), r.status_code, r.json()))
        return out

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = [row for rows in pool.map(worker, range(8)) for row in rows]
    assert len(results) == 400
    for i, j, status, body in results:
        assert status == 200, body
        want = float(emb[i] @ emb[j])
        assert abs(body["similarity"] - want) < 1e-5, (i, j, body["similarity"], want)
        if abs(want - threshold) > 1e-5:  # a pair within float noise of the threshold may go either way
            assert body["same"] == (want >= threshold)
    after = client.get("/health").json()["batching"]
    images, batches = after["images"] - before["images"], after["batches"] - before["batches"]
    assert images == 800
    assert batches < 400 and after["largest"] > 2  # requests of different callers shared model calls


def test_a_bundle_is_served_through_its_export_and_a_busy_port_is_one_line(trained, offline):
    embedder = load_model(str(trained), aligned=False, threads=0)
    files = att_paths(4, seed=9)
    assert np.abs(embedder.embed(files) - offline.embed(files)).max() < 1e-5
    assert embedder.meta["threshold"] == offline.meta["threshold"]
    from fastapi.testclient import TestClient  # in-process: a service started without --gallery

    with TestClient(build_app(embedder)) as c:
        r = c.post("/identify", json={"image": b64(files[0])})
        assert r.status_code == 404 and "--gallery" in r.json()["error"]
        assert c.get("/health").json()["gallery"] is None
    sock = listen("127.0.0.1", 0)
    try:
        with pytest.raises(UserError, match="cannot listen on 127.0.0.1"):
            listen("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()
    with pytest.raises(UserError, match="--gallery: folder not found"):
        serve.main(["--model", str(trained), "--gallery", str(trained / "nope")])
