"""Running the service: the model it answers with, the listening socket, and uvicorn serving the app on it."""

from __future__ import annotations

import socket
import sys
import tempfile
from pathlib import Path

from facetrain.deploy.app import serve_extra_missing
from facetrain.deploy.gallery_cache import file_sha256
from facetrain.deploy.onnx_embedder import OnnxEmbedder
from facetrain.errors import UserError
from facetrain.model.files import EXPORT_FILE, is_onnx_file

#: Connections the listening socket queues before the server accepts them (listen(2) backlog).
LISTEN_BACKLOG = 2048


def require_uvicorn():
    try:
        import uvicorn
    except ImportError:
        raise serve_extra_missing() from None
    return uvicorn


def load_model(model: str, aligned: bool, threads: int) -> OnnxEmbedder:
    """An OnnxEmbedder for a .onnx file, or for a bundle exported to a temporary file first (which imports
    PyTorch: `deploy.export`)."""
    if is_onnx_file(model):
        return OnnxEmbedder.load(model, aligned=aligned, threads=threads)
    from facetrain.deploy.export import export

    with tempfile.TemporaryDirectory(prefix="facetrain-serve-") as tmp:
        result = export(model, Path(tmp) / EXPORT_FILE)
        print(f"facetrain.serve: exported {result['model']} for onnxruntime (flip test "
              f"{'on' if result['flip_test'] else 'off'}); `python -m facetrain.export` writes it once for good",
              file=sys.stderr, flush=True)
        embedder = OnnxEmbedder.load(result["output"], aligned=aligned, threads=threads)  # the session keeps the graph
        embedder.weights_sha256 = file_sha256(result["output"])  # the gallery cache's key, before the file goes
        return embedder


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
    sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)
    return sock


def serve(app, sock: socket.socket) -> None:
    """Serve `app` on `sock` until the process is stopped."""
    uvicorn = require_uvicorn()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    server.run(sockets=[sock])
