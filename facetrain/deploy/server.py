"""Running the service: the model it answers with, the listening socket, and uvicorn serving the app on it,
with a deadline for every request's headers and a cap on connections (`deploy.limits.Limits`)."""

from __future__ import annotations

import socket
import sys
import tempfile
from pathlib import Path

from facetrain.deploy.app import serve_extra_missing
from facetrain.deploy.gallery_cache import file_sha256
from facetrain.deploy.limits import Limits
from facetrain.deploy.onnx_embedder import OnnxEmbedder
from facetrain.errors import UserError
from facetrain.model.files import EXPORT_FILE, is_onnx_file

#: Connections the listening socket queues before the server accepts them (listen(2) backlog).
LISTEN_BACKLOG = 2048
#: Seconds an idle keep-alive connection stays open after an answer (uvicorn's timeout_keep_alive).
KEEP_ALIVE_S = 5
#: Connections over this many times --max-connections are closed as they open, without a 503 (uvicorn answers
#: 503 only once a request's headers are complete, so a flood of silent connections would hold a file
#: descriptor each until the header deadline).
CLOSE_OVER_CAP_FACTOR = 2
#: What a connection whose request headers are late gets before it is closed (when it sent any byte of them).
_TIMEOUT_BODY = b'{"error": "request headers not received in time"}'
REQUEST_TIMEOUT_ANSWER = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                          b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))


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


def header_deadline_protocol(header_timeout_s: float):
    """uvicorn's h11 protocol with a deadline for request headers, which uvicorn lacks (its keep-alive timeout
    starts only after an answer, and any byte resets it): a connection that has not sent a request's complete
    headers `header_timeout_s` seconds after it opened, or after its previous answer, is closed (with a 408 if
    it had sent part of them). Connections over CLOSE_OVER_CAP_FACTOR x the connection cap are closed at once.
    Slow bodies are the app's: `http_input.read_body`."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineProtocol(H11Protocol):
        _deadline = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.trailing_data[0]:  # part of a request arrived: say why it ends
                self.transport.write(REQUEST_TIMEOUT_ANSWER)
            self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            cap = self.limit_concurrency
            if cap is not None and len(self.connections) > CLOSE_OVER_CAP_FACTOR * cap:
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are complete: the app times the body
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers, on a kept-alive connection

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadlineProtocol


def serve(app, sock: socket.socket, limits: Limits | None = None) -> None:
    """Serve `app` on `sock` until the process is stopped, within `limits` (header deadline, connections)."""
    uvicorn = require_uvicorn()
    limits = limits or Limits()
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            http=header_deadline_protocol(limits.header_timeout_s),
                            limit_concurrency=limits.max_connections, timeout_keep_alive=KEEP_ALIVE_S)
    uvicorn.Server(config).run(sockets=[sock])
