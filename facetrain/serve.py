"""HTTP/JSON verification service over an exported model (FastAPI + uvicorn, onnxruntime; no torch for a .onnx).

    python -m facetrain.serve --model runs/exp/bundle/model.onnx                    # http://127.0.0.1:8000
    python -m facetrain.serve --model runs/exp/bundle --gallery /data/staff --port 8080   # a bundle: exported first

Endpoints (JSON in and out; images are the bytes of an image file, base64-encoded):
    POST /verify    {"image_a": b64, "image_b": b64[, "threshold": t]} -> similarity, decision at the
                    calibrated threshold ("same"), the threshold and the FAR it was calibrated at
    POST /embed     {"image": b64} or {"images": [b64, ...]} -> L2-normalised embeddings
    POST /identify  {"image": b64[, "top_k": k]} -> the best-matching identities of the gallery (--gallery DIR,
                    <DIR>/<identity>/<image>, enrolled at start through the same embedding path)
    GET  /health    model, threshold, gallery, batching counters

Every image goes through the offline path (`onnx_runtime.OnnxEmbedder.prepare`: `images.load_image`, the
model's face alignment unless --aligned, PIL resize), so an answer equals `facetrain.verify --backend
onnxruntime` on the same files. The model runs on one thread of its own; requests that arrive within
--batch-window-ms of each other (or while a batch runs) are embedded together, up to --max-batch images,
so throughput grows with the number of concurrent callers. Bad requests get a 4xx and {"error": one line}:
413 body, image bytes or pixels over the limits, 415 not JSON or not an image, 422 malformed JSON, fields or
base64, or a photo without a usable face, 404 unknown path or /identify without a gallery.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' `request: Request` annotations at
# runtime, and Request is imported inside build_app (FastAPI is optional).
import argparse
import asyncio
import base64
import binascii
import io
import json
import os
import socket
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facetrain.runtime import threads

# before torch loads (a bundle is exported through PyTorch at start): facetrain/runtime/threads.py
os.environ.update(threads.wait_policy())
from facetrain.cli import (  # noqa: E402
    ArgumentParser,  # torch-free: the service never imports torch
    run_cli,
)
from facetrain.errors import UserError

SERVE_EXTRA = 'pip install -e ".[serve]"'


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
# Batching across callers


class Batcher:
    """Embeds the images of concurrent requests together, on one model thread.

    The loop takes the first waiting request and everything queued behind it; while the batch is smaller
    than `max_batch` images it waits `window_s` once for more callers. Requests that arrive while a batch
    runs are queued and go in the next one, so under load the batches fill without waiting."""

    def __init__(self, run, max_batch: int, window_s: float):
        self.run, self.max_batch, self.window_s = run, max_batch, window_s
        self.batches = self.images = self.largest = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="facetrain-model")
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def embed(self, arrays: list[np.ndarray]) -> np.ndarray:
        """(len(arrays), D) embeddings of one request's prepared images."""
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((arrays, future))
        return await future

    def _drain(self, items: list, n: int, carry: list) -> int:
        while n < self.max_batch and not self._queue.empty():
            item = self._queue.get_nowait()
            if n + len(item[0]) > self.max_batch:  # would overflow: first in the next batch
                carry.append(item)
                break
            items.append(item)
            n += len(item[0])
        return n

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        carry: list = []
        while True:
            items = [carry.pop() if carry else await self._queue.get()]
            n = self._drain(items, len(items[0][0]), carry)
            if n < self.max_batch and not carry and self.window_s > 0:
                await asyncio.sleep(self.window_s)
                n = self._drain(items, n, carry)
            live = [(arrays, future) for arrays, future in items if not future.done()]  # callers still there
            if not live:
                continue
            batch = np.stack([a for arrays, _ in live for a in arrays])
            try:
                emb = await loop.run_in_executor(self._executor, self.run, batch)
            except Exception as err:  # the model failed: every caller of this batch gets the error
                for _, future in live:
                    if not future.done():
                        future.set_exception(err)
                continue
            self.batches, self.images, self.largest = self.batches + 1, self.images + n, max(self.largest, n)
            start = 0
            for arrays, future in live:
                if not future.done():
                    future.set_result(emb[start:start + len(arrays)])
                start += len(arrays)


# ----------------------------------------------------------------------------------------------------------
# Gallery


@dataclass
class Gallery:
    root: str
    paths: list[str]
    labels: np.ndarray
    names: list[str]
    embeddings: np.ndarray  # (N, D) float32, L2-normalised

    def rank(self, probe: np.ndarray, top_k: int) -> list[dict]:
        """The top_k identities by best-image cosine similarity (`identify.rank_identities`'s rule)."""
        scores = self.embeddings.astype(np.float64) @ probe.astype(np.float64)
        per_id = np.full(len(self.names), -np.inf)
        np.maximum.at(per_id, self.labels, scores)
        order = np.argsort(-per_id, kind="stable")[:top_k]
        rows = []
        for ident in order:
            members = np.flatnonzero(self.labels == ident)
            best = int(members[np.argmax(scores[members])])
            rows.append({"identity": self.names[ident], "score": float(per_id[ident]), "image": self.paths[best]})
        return rows


def enrol(embedder, root: str) -> Gallery:
    from facetrain.data.faceset import scan_identity_folder

    paths, labels, names = scan_identity_folder(root, "--gallery")
    align = not embedder.aligned_folder(root, "--gallery")  # crops of facetrain.align with the model's recipe
    return Gallery(root, paths, labels, names, embedder.embed(paths, align=align))


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


def prepare(embedder, raw: bytes, name: str, limits: Limits) -> np.ndarray:
    """Image file bytes -> the model input, through `images.load_image` as offline. The header is read first
    (PIL's lazy open) so an oversized image is refused before its pixels are decoded."""
    from PIL import Image

    from facetrain.deploy.onnx_embedder import AlignmentFailed

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
        return embedder.prepare(header, name=name)
    except AlignmentFailed as err:
        raise RequestError(422, str(err)) from None
    except Exception as err:  # truncated or corrupt pixel data
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise RequestError(415, f"{name}: cannot decode image ({type(err).__name__}: {first})") from None


# ----------------------------------------------------------------------------------------------------------
# The application


def threshold_info(meta: dict) -> dict:
    return {"threshold": meta.get("threshold"), "threshold_far": meta.get("threshold_far")}


def build_app(embedder, gallery: Gallery | None = None, limits: Limits | None = None, max_batch: int = 32,
              window_ms: float = 5.0):
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse
        from starlette.concurrency import run_in_threadpool
        from starlette.exceptions import HTTPException
    except ImportError:
        raise UserError(f"facetrain.serve needs FastAPI and uvicorn: {SERVE_EXTRA}") from None

    limits = limits or Limits()
    embedder.batch_size = max_batch
    batcher = Batcher(embedder.run, max_batch, window_ms / 1000.0)
    meta = embedder.meta

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="facetrain verification service", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.batcher = batcher

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

    async def embed_fields(data: dict, keys: list[str], values: list | None = None) -> np.ndarray:
        raws = [image_bytes(data, key, limits, None if values is None else values[k]) for k, key in enumerate(keys)]
        arrays = [await run_in_threadpool(prepare, embedder, raw, key, limits) for raw, key in zip(raws, keys,
                                                                                                   strict=True)]
        return await batcher.embed(arrays)

    @app.get("/health")
    async def health():
        return {
            "status": "ok", "model": str(embedder.path), "backbone": meta["model"]["backbone"],
            "embedding_dim": embedder.embedding_dim, "input_size": embedder.preprocess.image_size,
            "flip": embedder.flip, "alignment": embedder.alignment, **threshold_info(meta),
            "gallery": None if gallery is None else {"root": gallery.root, "images": len(gallery.paths),
                                                     "identities": len(gallery.names)},
            "batching": {"max_batch": batcher.max_batch, "window_ms": window_ms, "batches": batcher.batches,
                         "images": batcher.images, "largest": batcher.largest},
            "limits": {"max_image_bytes": limits.max_image_bytes, "max_pixels": limits.max_pixels,
                       "max_images": limits.max_images},
        }

    @app.post("/verify")
    async def verify(request: Request):
        data = await read_json(request, limits)
        threshold, source, far = data.get("threshold"), "request", None
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)):
            raise RequestError(422, f"field 'threshold' must be a number, got {type(threshold).__name__}")
        emb = await embed_fields(data, ["image_a", "image_b"])
        similarity = float(np.dot(emb[0].astype(np.float64), emb[1].astype(np.float64)))
        if threshold is None:
            threshold, far = meta.get("threshold"), meta.get("threshold_far")
            source = "model" if threshold is not None else None
        return {"similarity": similarity, "same": None if threshold is None else bool(similarity >= threshold),
                "threshold": threshold, "threshold_source": source, "threshold_far": far, "flip": embedder.flip}

    @app.post("/embed")
    async def embed(request: Request):
        data = await read_json(request, limits)
        if "images" in data:
            values = data["images"]
            if not isinstance(values, list) or not values:
                raise RequestError(422, "field 'images' must be a non-empty list of base64 strings")
            if len(values) > limits.max_images:
                raise RequestError(413, f"{len(values)} images in one request, over the limit of {limits.max_images}")
            emb = await embed_fields(data, [f"images[{k}]" for k in range(len(values))], values)
        else:
            emb = await embed_fields(data, ["image"])
        return {"embeddings": emb.tolist(), "dim": int(emb.shape[1]), "flip": embedder.flip}

    @app.post("/identify")
    async def identify(request: Request):
        data = await read_json(request, limits)
        if gallery is None:
            raise RequestError(404, "no gallery enrolled: start the service with --gallery DIR "
                                    "(DIR/<identity>/<image>)")
        top_k = data.get("top_k", 5)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise RequestError(422, f"field 'top_k' must be an integer >= 1, got {top_k!r}")
        emb = await embed_fields(data, ["image"])
        rows = gallery.rank(emb[0], min(top_k, len(gallery.names)))
        threshold = meta.get("threshold")
        return {"matches": rows, "match": None if threshold is None else bool(rows[0]["score"] >= threshold),
                **threshold_info(meta)}

    return app


# ----------------------------------------------------------------------------------------------------------
# Command line


def build_parser():
    p = ArgumentParser(prog="facetrain.serve", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model.onnx from facetrain.export, or a bundle (exported to a "
                   "temporary file at start, which needs PyTorch)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--gallery", default="", help="folder <gallery>/<identity>/<image> enrolled at start for /identify")
    p.add_argument("--aligned", action="store_true", help="requests carry aligned face crops: do not apply the "
                   "model's alignment recipe")
    p.add_argument("--max-batch", type=int, default=32, help="most images embedded in one model call (default 32)")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="how long a batch waits for more callers "
                   "when it is not full (default 5 ms)")
    p.add_argument("--max-image-bytes", type=int, default=Limits.max_image_bytes,
                   help=f"largest image file accepted (default {Limits.max_image_bytes:,} bytes)")
    p.add_argument("--max-pixels", type=int, default=Limits.max_pixels,
                   help=f"largest image accepted, width x height (default {Limits.max_pixels:,})")
    p.add_argument("--max-images", type=int, default=Limits.max_images,
                   help=f"most images in one /embed request (default {Limits.max_images})")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default 0: one per core)")
    return p


def check_args(args) -> None:
    for key in ("max_batch", "max_image_bytes", "max_pixels", "max_images"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')}: must be >= 1, got {getattr(args, key)}")
    if args.batch_window_ms < 0:
        raise UserError(f"--batch-window-ms: must be >= 0, got {args.batch_window_ms}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port: must be 0..65535, got {args.port}")
    if args.gallery and not Path(args.gallery).is_dir():
        raise UserError(f"--gallery: folder not found: {args.gallery} (expected {args.gallery}/<identity>/<image>)")


def load_model(model: str, aligned: bool, threads: int):
    """An OnnxEmbedder for a .onnx file, or for a bundle exported to a temporary file first."""
    from facetrain.deploy.onnx_embedder import OnnxEmbedder, is_onnx_file

    if is_onnx_file(model):
        return OnnxEmbedder.load(model, aligned=aligned, threads=threads)
    from facetrain.export import export

    with tempfile.TemporaryDirectory(prefix="facetrain-serve-") as tmp:
        result = export(model, Path(tmp) / "model.onnx")
        print(f"facetrain.serve: exported {result['model']} for onnxruntime (flip test "
              f"{'on' if result['flip_test'] else 'off'}); `python -m facetrain.export` writes it once for good",
              file=sys.stderr, flush=True)
        return OnnxEmbedder.load(result["output"], aligned=aligned, threads=threads)  # the session keeps the graph


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a port in use is a one-line error (uvicorn then serves on it)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UserError(f"--host: cannot resolve {host!r} ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections of such a socket; without it every
    # response waits ~40 ms (Nagle's algorithm against the client's delayed ACK)
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise UserError(f"--port: cannot listen on {host}:{port} ({err.strerror}); choose another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    try:
        import uvicorn
    except ImportError:
        raise UserError(f"facetrain.serve needs FastAPI and uvicorn: {SERVE_EXTRA}") from None
    embedder = load_model(args.model, args.aligned, args.threads)
    gallery = None
    if args.gallery:
        gallery = enrol(embedder, args.gallery)
        print(f"facetrain.serve: gallery {args.gallery}: {len(gallery.paths)} images of {len(gallery.names)} "
              "identities", file=sys.stderr, flush=True)
    limits = Limits(args.max_image_bytes, args.max_pixels, args.max_images)
    app = build_app(embedder, gallery, limits, args.max_batch, args.batch_window_ms)
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    threshold = embedder.meta.get("threshold")
    far = embedder.meta.get("threshold_far")
    note = ("no calibrated threshold (answers carry the similarity only)" if threshold is None else
            f"threshold {threshold:.4f}" + (f" at FAR {far:.0e}" if far is not None else ""))
    print(f"facetrain.serve: {embedder.path} ({note}) on http://{host}:{port} (POST /verify /embed /identify, "
          "GET /health)", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    server.run(sockets=[sock])
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
