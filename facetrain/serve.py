"""HTTP/JSON verification service over an exported model (FastAPI + uvicorn, onnxruntime; no torch for a .onnx).

    python -m facetrain.serve --model runs/exp/bundle/model.onnx                    # http://127.0.0.1:8000
    python -m facetrain.serve --model runs/exp/bundle --gallery /data/staff --port 8080   # a bundle: exported first

Endpoints (JSON in and out; images are the bytes of an image file, base64-encoded):
    POST /verify    {"image_a": b64, "image_b": b64[, "threshold": t]} -> similarity, decision at the
                    calibrated threshold ("same"), the threshold and the FAR it was calibrated at
    POST /embed     {"image": b64} or {"images": [b64, ...]} -> L2-normalised embeddings
    POST /identify  {"image": b64[, "top_k": k]} -> the best-matching identities of the gallery (--gallery DIR,
                    <DIR>/<identity>/<image>, enrolled at start as facetrain.identify enrols it: every bad or
                    faceless photo named, or left out with --bad-images skip; cached in --cache-dir)
    GET  /health    model, threshold, gallery, batching counters, limits, rejected requests

Every image goes through the offline path (`deploy.onnx_embedder.OnnxEmbedder.prepare`: `images.load_image`, the
model's face alignment unless --aligned, PIL resize), so an answer equals `facetrain.verify --backend
onnxruntime` on the same files. The model runs on one thread of its own; requests that arrive within
--batch-window-ms of each other (or while a batch runs) are embedded together, up to --max-batch images,
so throughput grows with the number of concurrent callers. Bad requests get a 4xx and {"error": one line}:
413 body, image bytes, pixels or decoded bytes over the limits, 415 not JSON or not an image, 422 malformed JSON,
fields or base64, or a photo without a usable face, 408 a body or headers sent too slowly, 400 a Host header
not allowed, 404 unknown path or /identify without a gallery. When the model aligns raw photos, every answer
says which face of each image it used ("faces": count, box, why). Running it on a network: docs/deploy.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from facetrain.runtime import threads

# before torch loads (a bundle is exported through PyTorch at start): facetrain/runtime/threads.py
os.environ.update(threads.wait_policy())
from facetrain.cli import ArgumentParser, run_cli  # noqa: E402  (torch-free: the service never imports torch)
from facetrain.deploy.app import build_app  # noqa: E402
from facetrain.deploy.gallery import enrol  # noqa: E402
from facetrain.deploy.http_input import default_allowed_hosts  # noqa: E402
from facetrain.deploy.limits import Limits  # noqa: E402
from facetrain.deploy.server import listen, load_model, require_uvicorn, serve  # noqa: E402
from facetrain.errors import UserError  # noqa: E402


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
                   help=f"largest image decoded, width x height (default {Limits.max_pixels:,}); a larger JPEG is "
                   "decoded at 1/2, 1/4 or 1/8 scale when that fits")
    p.add_argument("--max-decoded-bytes", type=int, default=Limits.max_decoded_bytes,
                   help=f"largest decoded image, width x height x bands x bytes per band (default "
                   f"{Limits.max_decoded_bytes:,})")
    p.add_argument("--max-images", type=int, default=Limits.max_images,
                   help=f"most images in one /embed request (default {Limits.max_images})")
    p.add_argument("--decode-workers", type=int, default=0, help="images decoded at the same time (default 0: "
                   "one per usable core)")
    p.add_argument("--header-timeout", type=float, default=Limits.header_timeout_s, help="seconds a connection "
                   f"has to send a request's headers (default {Limits.header_timeout_s:g})")
    p.add_argument("--body-timeout", type=float, default=Limits.body_timeout_s, help="seconds a request has to "
                   f"send its whole body after its headers, else 408 (default {Limits.body_timeout_s:g})")
    p.add_argument("--max-connections", type=int, default=Limits.max_connections, help="open connections at most; "
                   f"requests over it are answered 503 (default {Limits.max_connections})")
    p.add_argument("--max-inflight-bytes", type=int, default=Limits.max_inflight_bytes, help="request body bytes "
                   f"held at once, all requests together; over it: 503 (default {Limits.max_inflight_bytes:,})")
    p.add_argument("--allowed-hosts", default="", help="comma-separated Host header names answered, '*' for any "
                   "(default: the loopback names when --host is loopback, else any)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default 0: one per core)")
    _add_gallery_options(p)
    return p


#: The smallest value of each numeric option.
MINIMUM = {"max_batch": 1, "max_image_bytes": 1, "max_pixels": 1, "max_decoded_bytes": 1, "max_images": 1,
           "decode_workers": 0, "max_connections": 1, "max_inflight_bytes": 1, "batch_window_ms": 0,
           "header_timeout": 0.1, "body_timeout": 0.1}


def _add_gallery_options(p) -> None:
    """How --gallery is enrolled: as facetrain.identify enrols it (pre-flight, faceless photos, cache)."""
    p.add_argument("--bad-images", default="error", choices=("error", "skip"), help="gallery photos that cannot "
                   "be decoded or have no usable face: error = name every one and refuse to start (default), skip "
                   "= enrol without them (counted in the log and /health)")
    p.add_argument("--cache-dir", default="", help="where the gallery's enrolment cache goes (default "
                   "$XDG_CACHE_HOME/facetrain, else ~/.cache/facetrain; shared with facetrain.identify)")
    p.add_argument("--no-cache", dest="cache", action="store_false", help="always re-embed the gallery at start")


def check_args(args) -> None:
    for key, low in MINIMUM.items():
        if getattr(args, key) < low:
            raise UserError(f"--{key.replace('_', '-')}: must be >= {low:g}, got {getattr(args, key):g}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port: must be 0..65535, got {args.port}")
    if args.gallery and not Path(args.gallery).is_dir():
        raise UserError(f"--gallery: folder not found: {args.gallery} (expected {args.gallery}/<identity>/<image>)")


def limits_of(args) -> Limits:
    limits = Limits(args.max_image_bytes, args.max_pixels, args.max_images, args.max_decoded_bytes,
                    header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                    max_connections=args.max_connections, max_inflight_bytes=args.max_inflight_bytes)
    if args.decode_workers:
        limits.decode_workers = args.decode_workers
    if limits.max_inflight_bytes < limits.max_body:
        raise UserError(f"--max-inflight-bytes: {limits.max_inflight_bytes:,} is less than the largest request body "
                        f"({limits.max_body:,} bytes, /embed's); raise it or lower --max-images / --max-image-bytes")
    return limits


def allowed_hosts_of(args) -> list[str]:
    given = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
    return given or default_allowed_hosts(args.host)


def _describe_threshold(meta: dict) -> str:
    threshold, far = meta.get("threshold"), meta.get("threshold_far")
    if threshold is None:
        return "no calibrated threshold (answers carry the similarity only)"
    return f"threshold {threshold:.4f}" + (f" at FAR {far:.0e}" if far is not None else "")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    limits, hosts = limits_of(args), allowed_hosts_of(args)
    require_uvicorn()
    embedder = load_model(args.model, args.aligned, args.threads)
    gallery = None
    if args.gallery:
        from facetrain.data.faceset import scan_identity_folder
        from facetrain.deploy.gallery_cache import default_cache_dir

        cache_dir = (args.cache_dir or default_cache_dir(os.environ)) if args.cache else None
        gallery = enrol(embedder, args.gallery, scan_identity_folder(args.gallery, "--gallery"), cache_dir,
                        args.bad_images)
        print(f"facetrain.serve: gallery {args.gallery}: {len(gallery.paths)} images of {len(gallery.names)} "
              f"identities ({len(gallery.skipped)} left out; cache: {gallery.cache_status})", file=sys.stderr,
              flush=True)
    app = build_app(embedder, gallery, limits, args.max_batch, args.batch_window_ms, hosts)
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    print(f"facetrain.serve: {embedder.path} ({_describe_threshold(embedder.meta)}) on http://{host}:{port} (POST "
          f"/verify /embed /identify, GET /health; Host names answered: {', '.join(hosts)})", file=sys.stderr,
          flush=True)
    serve(app, sock, limits)
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
