"""What HTTP clients send the verification service: base64 as their libraries write it (MIME line breaks, the
URL-safe alphabet, no padding) is accepted; a format facetrain does not read (EPS, HEIC, ...) is a 415 naming
it, and EPS never runs Ghostscript; a photo without a face is a 422 from /embed that tells the client what it can
do (and a failure to acquire in /verify's answer: test_fta).

In-process (FastAPI's TestClient) with a stand-in model: no shared data, no ONNX file, a fraction of a second."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("httpx", reason='needs the serve extra: pip install -e ".[serve]"')
pytest.importorskip("fastapi", reason='needs the serve extra: pip install -e ".[serve]"')

from fastapi.testclient import TestClient  # noqa: E402
from helpers import REFUSED_SIGNATURES, fake_ghostscript  # noqa: E402

from facetrain.alignment.check import AlignmentFailed  # noqa: E402
from facetrain.data.images import Preprocess, load_image  # noqa: E402
from facetrain.deploy.app import build_app  # noqa: E402
from facetrain.deploy.onnx_embedder import to_input_array  # noqa: E402

SIZE = 8  # the stand-in model's input side, pixels
FACELESS_WIDTH = 7  # the stand-in's alignment finds no face in images this wide


class StandIn:
    """The parts of `OnnxEmbedder` the service uses; the embedding is the normalised input pixels, so equal
    answers mean equal decoded images."""

    path, flip, alignment, embedding_dim, batch_size = Path("stand-in.onnx"), False, None, SIZE * SIZE * 3, 1
    meta = {"threshold": None, "threshold_far": None, "model": {"backbone": "stand-in"}}
    preprocess = Preprocess(SIZE, [0.5] * 3, [0.5] * 3)

    def prepare(self, source, name: str = "image", face: dict | None = None) -> np.ndarray:
        img = load_image(source, keep_gray=True)
        if img.width == FACELESS_WIDTH:
            raise AlignmentFailed(name, "no_face", "no face with confidence >= 0.9")
        return to_input_array(img, SIZE)

    def run(self, batch: np.ndarray) -> np.ndarray:
        flat = batch.reshape(len(batch), -1).astype(np.float32)
        return flat / np.linalg.norm(flat, axis=1, keepdims=True).clip(1e-6)


@pytest.fixture
def fake_gs(tmp_path, monkeypatch):
    return fake_ghostscript(tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def client():
    with TestClient(build_app(StandIn())) as c:
        yield c


def _png(width: int = 40, height: int = 30) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_mime_wrapped_and_url_safe_base64_are_accepted():
    raw = _png()
    standard = base64.b64encode(raw).decode()
    assert "+" in standard or "/" in standard  # so that the URL-safe alphabet differs from it
    variants = {
        "mime": base64.encodebytes(raw).decode(),  # a line break every 76 characters (email, Java's MIME encoder)
        "crlf": base64.encodebytes(raw).decode().replace("\n", "\r\n"),
        "url_safe": base64.urlsafe_b64encode(raw).decode(),
        "url_safe_unpadded": base64.urlsafe_b64encode(raw).decode().rstrip("="),
        "data_url_mime": "data:image/png;base64," + base64.encodebytes(raw).decode(),
    }
    assert "\n" in variants["mime"] and variants["url_safe"] != standard
    with TestClient(build_app(StandIn())) as c:
        want = c.post("/embed", json={"image": standard})
        assert want.status_code == 200, want.text
        for name, value in variants.items():
            got = c.post("/embed", json={"image": value})
            assert got.status_code == 200, (name, got.text)
            assert got.json()["embeddings"] == want.json()["embeddings"], name
        bad = c.post("/embed", json={"image": standard[:40] + "*" + standard[40:]})
        assert bad.status_code == 422 and "not valid base64" in bad.json()["error"]
        assert "URL-safe" in bad.json()["error"] and "\n" not in bad.json()["error"]


def test_eps_is_refused_without_running_ghostscript_and_other_formats_are_named(client, fake_gs):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "EPS")
    got = client.post("/embed", json={"image": base64.b64encode(buf.getvalue()).decode()})
    assert got.status_code == 415, got.text
    error = got.json()["error"]
    assert error.startswith("image: EPS/PostScript file") and "convert it to JPEG or PNG" in error
    assert "gs" not in error.split() and "/tmp" not in error, error  # no command line, no server path
    assert not fake_gs.exists(), fake_gs.read_text()
    for name, head in REFUSED_SIGNATURES.items():
        got = client.post("/verify", json={"image_a": base64.b64encode(_png()).decode(),
                                           "image_b": base64.b64encode(head + b"\x00" * 64).decode()})
        assert got.status_code == 415 and got.json()["error"].startswith(f"image_b: {name} file"), got.text
    got = client.post("/embed", json={"image": base64.b64encode(_png()[:40]).decode()})
    assert got.status_code == 415 and got.json()["error"] == ("image: truncated or damaged PNG file (its header "
                                                              "does not decode)"), got.text


def test_a_photo_without_a_face_tells_the_client_what_to_do_not_a_cli_flag(client):
    got = client.post("/embed", json={"images": [base64.b64encode(_png()).decode(),
                                                 base64.b64encode(_png(width=FACELESS_WIDTH)).decode()]})
    assert got.status_code == 422, got.text
    error = got.json()["error"]
    assert error.startswith("images[1]: no face (") and "one clearly visible face" in error, error
    assert "--" not in error and "pass" not in error, error  # a client has no command line
