"""The HTTP/JSON verification service as an ASGI app (FastAPI): POST /verify, /embed, /identify, GET /health.

`build_app(embedder, gallery, limits, max_batch, window_ms)`: an `OnnxEmbedder` answers every request, through
the same path as offline embedding (`OnnxEmbedder.prepare`), with requests of concurrent callers batched
together (`deploy.batching.Batcher`); /identify ranks against a `deploy.gallery.Gallery`. Bad requests get a
4xx and {"error": one line}, never a traceback. FastAPI is optional (the "serve" extra) and imported by
`build_app` only; nothing here imports torch. `deploy.server` runs the app; `facetrain.serve` is the command.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' `request: Request` annotations at
# runtime, and Request is imported inside build_app (FastAPI is optional).
import base64
import binascii
import io
import json
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image

from facetrain.alignment.check import AlignmentFailed
from facetrain.deploy.batching import Batcher
from facetrain.deploy.gallery import Gallery, rank_identities
from facetrain.errors import INSTALL, UserError


def serve_extra_missing() -> UserError:
    return UserError(f"facetrain.serve needs FastAPI and uvicorn: {INSTALL['serve']}")


class RequestError(Exception):
    """A bad request: answered with `status` and {"error": message}, never a traceback."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Limits:
    max_image_bytes: int = 10_000_000
    """Largest image file accepted (bytes, after base64 decoding)."""
    max_pixels: int = 40_000_000
    """Largest image accepted (width x height, read from the header before any pixel is decoded)."""
    max_images: int = 16
    """Most images in one /embed request."""

    @property
    def max_body(self) -> int:
        """Largest request body: the biggest request is max_images images, base64 (4/3) plus JSON framing."""
        return (self.max_image_bytes * 4 // 3 + 1024) * max(2, self.max_images) + 4096


# ----------------------------------------------------------------------------------------------------------
# Requests


async def read_json(request, limits: Limits) -> dict:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise RequestError(415, f"send JSON (Content-Type: application/json, got {ctype or 'none'!r}) with "
                                "base64-encoded image files")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limits.max_body:
        raise RequestError(413, f"request body of {int(length):,} bytes is over the limit of {limits.max_body:,}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body:
            raise RequestError(413, f"request body is over the limit of {limits.max_body:,} bytes")
    try:
        data = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(422, f"malformed JSON ({err})") from None
    if not isinstance(data, dict):
        raise RequestError(422, f"expected a JSON object, got {type(data).__name__}")
    return data


def image_bytes(data: dict, key: str, limits: Limits, value=None) -> bytes:
    """The decoded base64 of field `key` (a data: URL prefix is accepted)."""
    value = data.get(key) if value is None else value
    if value is None:
        raise RequestError(422, f"missing field {key!r} (base64 of an image file)")
    if not isinstance(value, str):
        raise RequestError(422, f"field {key!r} must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    if len(value) > limits.max_image_bytes * 4 // 3 + 4:
        raise RequestError(413, f"{key}: image over the limit of {limits.max_image_bytes:,} bytes")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(422, f"{key}: not valid base64 ({err})") from None
    if not raw:
        raise RequestError(422, f"{key}: empty image")
    if len(raw) > limits.max_image_bytes:
        raise RequestError(413, f"{key}: image of {len(raw):,} bytes is over the limit of {limits.max_image_bytes:,}")
    return raw


def prepare(embedder, raw: bytes, name: str, limits: Limits, face: dict | None = None) -> np.ndarray:
    """Image file bytes -> the model input, through `images.load_image` as offline. The header is read first
    (PIL's lazy open) so an oversized image is refused before its pixels are decoded."""
    try:
        header = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as err:
        raise RequestError(413, f"{name}: {err}") from None
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for non-images
        raise RequestError(415, f"{name}: not an image file PIL can read ({type(err).__name__})") from None
    width, height = header.size
    if width * height > limits.max_pixels:
        raise RequestError(413, f"{name}: {width}x{height} = {width * height:,} pixels is over the limit of "
                                f"{limits.max_pixels:,}")
    try:
        return embedder.prepare(header, name=name, face=face)  # face: which one was used, when aligned
    except AlignmentFailed as err:
        raise RequestError(422, str(err)) from None
    except Exception as err:  # truncated or corrupt pixel data
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise RequestError(415, f"{name}: cannot decode image ({type(err).__name__}: {first})") from None


# ----------------------------------------------------------------------------------------------------------
# The answers


def threshold_info(meta: dict) -> dict:
    return {"threshold": meta.get("threshold"), "threshold_far": meta.get("threshold_far")}


@dataclass
class Service:
    """What the endpoints answer, given a request's parsed JSON."""

    embedder: object
    gallery: Gallery | None
    limits: Limits
    batcher: Batcher
    window_ms: float

    async def embed_fields(self, data: dict, keys: list[str], values: list | None = None,
                           faces: list | None = None) -> np.ndarray:
        """Embeddings of the images in fields `keys`; `faces` gets, per image, which face was used (or None
        when images are embedded as they are)."""
        from starlette.concurrency import run_in_threadpool

        raws = [image_bytes(data, key, self.limits, None if values is None else values[k])
                for k, key in enumerate(keys)]
        found = [{} for _ in raws]
        arrays = [await run_in_threadpool(prepare, self.embedder, raw, key, self.limits, face)
                  for raw, key, face in zip(raws, keys, found, strict=True)]
        if faces is not None:
            faces.extend(face or None for face in found)
        return await self.batcher.embed(arrays)

    def health(self) -> dict:
        embedder, gallery, batcher, limits = self.embedder, self.gallery, self.batcher, self.limits
        return {
            "status": "ok", "model": str(embedder.path), "backbone": embedder.meta["model"]["backbone"],
            "embedding_dim": embedder.embedding_dim, "input_size": embedder.preprocess.image_size,
            "flip": embedder.flip, "alignment": embedder.alignment, **threshold_info(embedder.meta),
            "gallery": None if gallery is None else {"root": gallery.root, "images": len(gallery.paths),
                                                     "identities": len(gallery.names),
                                                     "left_out": len(gallery.skipped)},
            "batching": {"max_batch": batcher.max_batch, "window_ms": self.window_ms, "batches": batcher.batches,
                         "images": batcher.images, "largest": batcher.largest},
            "limits": {"max_image_bytes": limits.max_image_bytes, "max_pixels": limits.max_pixels,
                       "max_images": limits.max_images},
        }

    async def verify(self, data: dict) -> dict:
        meta = self.embedder.meta
        threshold, source, far = data.get("threshold"), "request", None
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)):
            raise RequestError(422, f"field 'threshold' must be a number, got {type(threshold).__name__}")
        faces: list = []
        emb = await self.embed_fields(data, ["image_a", "image_b"], faces=faces)
        similarity = float(np.dot(emb[0].astype(np.float64), emb[1].astype(np.float64)))
        if threshold is None:
            threshold, far = meta.get("threshold"), meta.get("threshold_far")
            source = "model" if threshold is not None else None
        return {"similarity": similarity, "same": None if threshold is None else bool(similarity >= threshold),
                "threshold": threshold, "threshold_source": source, "threshold_far": far, "flip": self.embedder.flip,
                "faces": faces}

    async def embed(self, data: dict) -> dict:
        faces: list = []
        if "images" in data:
            values = data["images"]
            if not isinstance(values, list) or not values:
                raise RequestError(422, "field 'images' must be a non-empty list of base64 strings")
            if len(values) > self.limits.max_images:
                raise RequestError(413, f"{len(values)} images in one request, over the limit of "
                                        f"{self.limits.max_images}")
            emb = await self.embed_fields(data, [f"images[{k}]" for k in range(len(values))], values, faces)
        else:
            emb = await self.embed_fields(data, ["image"], faces=faces)
        return {"embeddings": emb.tolist(), "dim": int(emb.shape[1]), "flip": self.embedder.flip, "faces": faces}

    async def identify(self, data: dict) -> dict:
        if self.gallery is None:
            raise RequestError(404, "no gallery enrolled: start the service with --gallery DIR "
                                    "(DIR/<identity>/<image>)")
        top_k = data.get("top_k", 5)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise RequestError(422, f"field 'top_k' must be an integer >= 1, got {top_k!r}")
        faces: list = []
        emb = await self.embed_fields(data, ["image"], faces=faces)
        rows = rank_identities(self.gallery, emb[:1], top_k)[0]
        threshold = self.embedder.meta.get("threshold")
        return {"matches": rows, "match": None if threshold is None else bool(rows[0]["score"] >= threshold),
                **threshold_info(self.embedder.meta), "faces": faces}


# ----------------------------------------------------------------------------------------------------------
# The application


def _add_error_handlers(app, JSONResponse, HTTPException) -> None:
    @app.exception_handler(RequestError)
    async def _request_error(request, err: RequestError):
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request, err: HTTPException):
        return JSONResponse({"error": f"{request.method} {request.url.path}: {err.detail}"},
                            status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, err: Exception):  # a bug, never a user's mistake: one line, no traceback
        print(f"facetrain.serve: error: {request.url.path}: {type(err).__name__}: {err}", file=sys.stderr,
              flush=True)
        return JSONResponse({"error": f"internal error ({type(err).__name__})"}, status_code=500)


def build_app(embedder, gallery: Gallery | None = None, limits: Limits | None = None, max_batch: int = 32,
              window_ms: float = 5.0):
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse
        from starlette.exceptions import HTTPException
    except ImportError:
        raise serve_extra_missing() from None

    limits = limits or Limits()
    embedder.batch_size = max_batch
    batcher = Batcher(embedder.run, max_batch, window_ms / 1000.0)
    service = Service(embedder, gallery, limits, batcher, window_ms)

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="facetrain verification service", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.batcher = batcher
    _add_error_handlers(app, JSONResponse, HTTPException)

    @app.get("/health")
    async def health():
        return service.health()

    @app.post("/verify")
    async def verify(request: Request):
        return await service.verify(await read_json(request, limits))

    @app.post("/embed")
    async def embed(request: Request):
        return await service.embed(await read_json(request, limits))

    @app.post("/identify")
    async def identify(request: Request):
        return await service.identify(await read_json(request, limits))

    return app
