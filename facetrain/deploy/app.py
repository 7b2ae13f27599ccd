"""The HTTP/JSON verification service as an ASGI app (FastAPI): POST /verify, /embed, /identify, GET /health.

`build_app(embedder, gallery, limits, max_batch, window_ms, allowed_hosts)`: an `OnnxEmbedder` answers every
request, through the same path as offline embedding (`OnnxEmbedder.prepare`), with requests of concurrent callers
batched together (`deploy.batching.Batcher`); /identify ranks against a `deploy.gallery.Gallery`. What a client
may send and cost is `deploy.limits` (body per endpoint, decode budget, deadlines); its body, JSON and Host
header are read by `deploy.http_input`; parsing and decoding run on a pool of `limits.decode_workers` threads.
Bad requests get a 4xx and {"error": one line}, never a traceback. FastAPI is optional (the "serve" extra) and
imported by `build_app` only; nothing here imports torch. `deploy.server` runs the app; `facetrain.serve` is the
command.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' `request: Request` annotations at
# runtime, and Request is imported inside build_app (FastAPI is optional).
import asyncio
import base64
import binascii
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from facetrain.alignment.check import AlignmentFailed
from facetrain.data.images import DamagedImage, open_image
from facetrain.deploy.batching import Batcher
from facetrain.deploy.gallery import Gallery, rank_identities
from facetrain.deploy.http_input import HostAllowList, int_field, number_field, parse_json, read_body, require_json
from facetrain.deploy.limits import BodyBudget, ClientGone, Limits, RequestError, fit_decode
from facetrain.errors import INSTALL, UserError

__all__ = ["Limits", "RequestError", "build_app"]  # Limits and RequestError live in deploy.limits

#: Aborted uploads are logged at most once per this many seconds (the others counted in /health), s.
ABORT_LOG_EVERY_S = 10.0


def serve_extra_missing() -> UserError:
    return UserError(f"facetrain.serve needs FastAPI and uvicorn: {INSTALL['serve']}")


# ----------------------------------------------------------------------------------------------------------
# Requests


async def read_json(request, limits: Limits, images: int, pool: ThreadPoolExecutor | None = None,
                    held=None) -> dict:
    """The JSON object of a request that carries at most `images` images: its body within that endpoint's
    limit, `limits.body_timeout_s` and the service's body budget (`held`), parsed on `pool` (off the loop)."""
    require_json(request)
    body = await read_body(request, limits.body_limit(images), limits.body_timeout_s, held)
    return await asyncio.get_running_loop().run_in_executor(pool, parse_json, body)


_URL_SAFE = str.maketrans("-_", "+/")  # RFC 4648 section 5's alphabet -> the standard one


def b64decode_lenient(compact: str) -> bytes:
    """Base64 as clients send it, once `"".join(value.split())` removed MIME's line breaks (RFC 2045: one every
    76 characters): standard or URL-safe alphabet, padded or not. Any other character is refused."""
    compact = compact.translate(_URL_SAFE)
    return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)


def image_bytes(data: dict, key: str, limits: Limits, value=None) -> bytes:
    """The decoded base64 of field `key` (a data: URL prefix is accepted)."""
    value = data.get(key) if value is None else value
    if value is None:
        raise RequestError(422, f"missing field {key!r} (base64 of an image file)")
    if not isinstance(value, str):
        raise RequestError(422, f"field {key!r} must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    value = "".join(value.split())
    if len(value) > limits.max_image_bytes * 4 // 3 + 4:
        raise RequestError(413, f"{key}: image over the limit of {limits.max_image_bytes:,} bytes")
    try:
        raw = b64decode_lenient(value)
    except (binascii.Error, ValueError) as err:
        raise RequestError(422, f"{key}: not valid base64 ({err}); send the image file's bytes in base64 (the "
                                "standard or the URL-safe alphabet; line breaks are ignored)") from None
    if not raw:
        raise RequestError(422, f"{key}: empty image")
    if len(raw) > limits.max_image_bytes:
        raise RequestError(413, f"{key}: image of {len(raw):,} bytes is over the limit of {limits.max_image_bytes:,}")
    return raw


class NoFace(RequestError):
    """A photo without a usable face: a 422 where an embedding is asked for (/embed), a failure to acquire where a
    decision is (/verify: not the same person; /identify: no match), answered with `record`."""

    def __init__(self, name: str, status: str, reason: str):
        super().__init__(422, f"{name}: {status.replace('_', ' ')} ({reason}): this service finds and aligns the "
                              "face in each photo; send a photo with one clearly visible face, or, to send face "
                              "crops, ask the service's operator to serve aligned crops")
        self.record = {"image": name, "problem": "no_face", "reason": status, "detail": reason}


def prepare(embedder, raw: bytes, name: str, limits: Limits, face: dict | None = None) -> np.ndarray:
    """Image file bytes -> the model input, through `images.load_image` as offline. The header is read first
    (PIL's lazy open) so an image over the decode budget is refused, or a large JPEG set to decode small
    (`limits.fit_decode`), before its pixels are decoded."""
    try:
        header = open_image(raw)  # images.FORMATS only: EPS would run Ghostscript on the client's PostScript
    except Image.DecompressionBombError as err:
        raise RequestError(413, f"{name}: {err}") from None
    except (Image.UnidentifiedImageError, DamagedImage) as err:  # images' one lines: the format named, no path
        raise RequestError(415, f"{name}: {err}") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ... for damaged headers
        raise RequestError(415, f"{name}: not an image file PIL can read ({type(err).__name__})") from None
    header = fit_decode(header, name, limits)
    try:
        return embedder.prepare(header, name=name, face=face)  # face: which one was used, when aligned
    except AlignmentFailed as err:  # its message is the CLI's ("pass --aligned"): a client has no flags
        raise NoFace(name, err.status, err.reason) from None
    except Exception as err:  # truncated or corrupt pixel data
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise RequestError(415, f"{name}: cannot decode image ({type(err).__name__}: {first})") from None


def decode_field(embedder, data: dict, key: str, limits: Limits, value, face: dict | None = None) -> np.ndarray:
    """One image field of a request -> the model input: base64, then the decode budget, then the offline path
    (`face` gets which face was used). Runs on the decode pool (base64 of 10 MB and a decode are CPU work that
    must not hold the event loop)."""
    return prepare(embedder, image_bytes(data, key, limits, value), key, limits, face)


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
    pool: ThreadPoolExecutor
    """`limits.decode_workers` threads: JSON parsing, base64 and image decoding, off the event loop."""
    bodies: BodyBudget
    """The request bodies held, all requests together."""
    rejected: dict = field(default_factory=dict)
    """Requests answered with an error, by status ("aborted": uploads the client gave up), for /health."""
    _log_after: float = 0.0  # monotonic time before which aborted uploads are counted, not logged
    _unlogged: int = 0

    def count(self, what) -> None:
        self.rejected[str(what)] = self.rejected.get(str(what), 0) + 1

    def log_abort(self, message: str) -> None:
        """One line per aborted upload, at most one every ABORT_LOG_EVERY_S (a client controls how many)."""
        now = time.monotonic()
        if now < self._log_after:
            self._unlogged += 1
            return
        more = f" (and {self._unlogged} more since the last such line)" if self._unlogged else ""
        _stderr(f"aborted upload: {message}{more}")
        self._log_after, self._unlogged = now + ABORT_LOG_EVERY_S, 0

    async def embed_fields(self, data: dict, keys: list[str], values: list | None = None,
                           faces: list | None = None, unacquired: list | None = None) -> np.ndarray | None:
        """Embeddings of the images in fields `keys`; `faces` gets, per image, which face was used (or None
        when images are embedded as they are). With `unacquired` (a list), photos without a face are failures
        to acquire recorded there (and None is returned) instead of a 422."""
        loop = asyncio.get_running_loop()
        found = [{} for _ in keys]
        jobs = [loop.run_in_executor(self.pool, decode_field, self.embedder, data, key, self.limits,
                                     None if values is None else values[k], found[k]) for k, key in enumerate(keys)]
        arrays = await asyncio.gather(*jobs, return_exceptions=True)
        for result in arrays:  # the first bad image in request order names the error
            if isinstance(result, BaseException) and not (isinstance(result, NoFace) and unacquired is not None):
                raise result
        if faces is not None:
            faces.extend(face or None for face in found)
        if unacquired is not None:
            unacquired.extend(r.record for r in arrays if isinstance(r, NoFace))
            if unacquired:  # nothing to compare: no model time spent
                return None
        return await self.batcher.embed(arrays)

    def health(self) -> dict:
        """The service's state; no server path (model file name only, no gallery folder)."""
        embedder, gallery, batcher = self.embedder, self.gallery, self.batcher
        return {
            "status": "ok", "model": embedder.path.name, "backbone": embedder.meta["model"]["backbone"],
            "embedding_dim": embedder.embedding_dim, "input_size": embedder.preprocess.image_size,
            "flip": embedder.flip, "alignment": embedder.alignment, **threshold_info(embedder.meta),
            "gallery": None if gallery is None else {"images": len(gallery.paths), "identities": len(gallery.names),
                                                     "left_out": len(gallery.skipped)},
            "batching": {"max_batch": batcher.max_batch, "window_ms": self.window_ms, "batches": batcher.batches,
                         "images": batcher.images, "largest": batcher.largest},
            "limits": self.limits.report(), "rejected": dict(self.rejected), "body_bytes_held": self.bodies.used,
        }

    async def verify(self, data: dict) -> dict:
        meta = self.embedder.meta
        threshold, source, far = number_field(data, "threshold"), "request", None
        faces: list = []
        unacquired: list = []
        emb = await self.embed_fields(data, ["image_a", "image_b"], faces=faces, unacquired=unacquired)
        if threshold is None:
            threshold, far = meta.get("threshold"), meta.get("threshold_far")
            source = "model" if threshold is not None else None
        if emb is None:  # a failure to acquire cannot match: not the same person, as facetrain.verify answers
            return {"similarity": None, "same": False, "threshold": threshold, "threshold_source": source,
                    "threshold_far": far, "flip": self.embedder.flip, "faces": faces, "failure_to_acquire": unacquired}
        similarity = float(np.dot(emb[0].astype(np.float64), emb[1].astype(np.float64)))
        return {"similarity": similarity, "same": None if threshold is None else bool(similarity >= threshold),
                "threshold": threshold, "threshold_source": source, "threshold_far": far, "flip": self.embedder.flip,
                "faces": faces, "failure_to_acquire": []}

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
        top_k = min(int_field(data, "top_k", 5, 1), len(self.gallery.names))
        faces: list = []
        unacquired: list = []
        emb = await self.embed_fields(data, ["image"], faces=faces, unacquired=unacquired)
        if emb is None:  # a probe without a face matches nobody
            return {"matches": [], "match": False, **threshold_info(self.embedder.meta), "faces": faces,
                    "failure_to_acquire": unacquired}
        rows = rank_identities(self.gallery, emb[:1], top_k)[0]
        for row in rows:  # the gallery's file names, never the server's path to them
            row["image"] = os.path.relpath(row["image"], self.gallery.root)
        threshold = self.embedder.meta.get("threshold")
        return {"matches": rows, "match": None if threshold is None else bool(rows[0]["score"] >= threshold),
                **threshold_info(self.embedder.meta), "faces": faces, "failure_to_acquire": []}


# ----------------------------------------------------------------------------------------------------------
# The application


def _stderr(message: str) -> None:
    print(f"facetrain.serve: {message}", file=sys.stderr, flush=True)


def _add_error_handlers(app, service: Service, respond, HTTPException) -> None:
    @app.exception_handler(RequestError)
    async def _request_error(request, err: RequestError):
        service.count(err.status)
        return respond(err.status, err.message, err.close)

    @app.exception_handler(ClientGone)
    async def _client_gone(request, err: ClientGone):  # nobody reads the answer: a quiet line, no traceback
        service.count("aborted")
        service.log_abort(str(err))
        return respond(400, str(err), True)

    @app.exception_handler(HTTPException)
    async def _http_error(request, err: HTTPException):
        service.count(err.status_code)
        return respond(err.status_code, f"{request.method} {request.url.path}: {err.detail}", False)

    @app.exception_handler(Exception)
    async def _internal(request, err: Exception):  # a bug, never a user's mistake: one line, no traceback
        service.count(500)
        _stderr(f"error: {request.url.path}: {type(err).__name__}: {err}")
        return respond(500, f"internal error ({type(err).__name__})", False)


def build_app(embedder, gallery: Gallery | None = None, limits: Limits | None = None, max_batch: int = 32,
              window_ms: float = 5.0, allowed_hosts: list[str] | None = None):
    """The service's ASGI app. allowed_hosts: the Host header names it answers (None: any; "*" in the list:
    any); `facetrain.serve` passes its --allowed-hosts or the loopback names when bound to loopback."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse
        from starlette.exceptions import HTTPException
    except ImportError:
        raise serve_extra_missing() from None

    def respond(status: int, message: str, close: bool):
        return JSONResponse({"error": message}, status_code=status, headers={"connection": "close"} if close else None)

    limits = limits or Limits()
    embedder.batch_size = max_batch
    batcher = Batcher(embedder.run, max_batch, window_ms / 1000.0)
    pool = ThreadPoolExecutor(max_workers=limits.decode_workers, thread_name_prefix="facetrain-decode")
    service = Service(embedder, gallery, limits, batcher, window_ms, pool, BodyBudget(limits.max_inflight_bytes))

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="facetrain verification service", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.batcher, app.state.service = batcher, service
    _add_error_handlers(app, service, respond, HTTPException)
    if allowed_hosts is not None:
        app.add_middleware(HostAllowList, hosts=allowed_hosts, respond=respond)

    @app.get("/health")
    async def health():
        return service.health()

    def endpoint(answer, images: int):
        async def handle(request: Request):
            with service.bodies.hold() as held:  # the body's bytes count until the answer
                return await answer(await read_json(request, limits, images, pool, held))
        return handle

    answers = {"/verify": service.verify, "/embed": service.embed, "/identify": service.identify}
    for path, images in limits.endpoint_images().items():  # each body limit sized to its endpoint's images
        app.add_api_route(path, endpoint(answers[path], images), methods=["POST"])
    return app
