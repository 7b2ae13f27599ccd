"""Reading what an HTTP client sends, defensively: the body within its endpoint's size limit and time limit,
the JSON parsed off the event loop with finite numbers only, typed fields, and the Host header allow-list.

Every problem is a `limits.RequestError` (a 4xx with one line) or `limits.ClientGone` (an aborted upload);
nothing a client sends reaches a 500. Nothing here imports torch or FastAPI.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math

from facetrain.deploy.limits import ClientGone, RequestError

#: Names of this machine that a loopback-bound service answers to by default (Host header, port removed).
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ANY_HOST = "*"


# ----------------------------------------------------------------------------------------------------------
# The body


def require_json(request) -> None:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise RequestError(415, f"send JSON (Content-Type: application/json, got {ctype or 'none'!r}) with "
                                "base64-encoded image files", close=True)


def _declared_length(request, limit: int) -> None:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise RequestError(413, f"{request.url.path}: request body of {int(length):,} bytes is over this "
                                f"endpoint's limit of {limit:,}", close=True)


async def read_body(request, limit: int, timeout_s: float, held=None) -> bytearray:
    """The request body, refused (413) as soon as it is over `limit` bytes, declared (Content-Length) or
    received (chunked too), and (408) when it has not fully arrived `timeout_s` seconds after this call.
    held: this request's share of the service's `limits.BodyBudget` (503 when the service holds too much)."""
    _declared_length(request, limit)
    path, body = request.url.path, bytearray()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            message = await asyncio.wait_for(request.receive(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise RequestError(408, f"{path}: request body not complete {timeout_s:g} s after its headers "
                                    f"({len(body):,} bytes received); send it faster", close=True) from None
        if message["type"] == "http.disconnect":
            raise ClientGone(path, len(body))
        chunk = message.get("body", b"")
        if held is not None:
            held.add(len(chunk))
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"{path}: request body is over this endpoint's limit of {limit:,} bytes",
                               close=True)
        if not message.get("more_body", False):
            return body  # not bytes(body): a copy of up to /embed's 235 MB


# ----------------------------------------------------------------------------------------------------------
# JSON


def _no_constant(name: str):
    raise RequestError(422, f"malformed JSON: {name} is not a number JSON allows; send finite numbers")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RequestError(422, f"malformed JSON: the number {text[:40]} is out of range; send finite numbers")
    return value


def parse_json(body: bytes | bytearray) -> dict:
    """A request body -> its JSON object. Run it off the event loop (a large body takes tens of ms). NaN,
    Infinity and numbers out of float range, nesting deeper than Python's recursion limit, invalid UTF-8 and
    anything but an object are 422 with one line."""
    try:
        data = json.loads(body, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise RequestError(422, "malformed JSON: nested too deeply (the requests hold an object of strings, "
                                "numbers and one list)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(422, f"malformed JSON ({str(err)[:200]})") from None
    if not isinstance(data, dict):
        raise RequestError(422, f"expected a JSON object, got {type(data).__name__}")
    return data


def number_field(data: dict, key: str) -> float | None:
    """Optional finite number `key` (JSON true/false are not numbers)."""
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError(422, f"field {key!r} must be a finite number, got {_describe(value)}")
    return float(value) if isinstance(value, float) else value


def int_field(data: dict, key: str, default: int, low: int) -> int:
    """Optional integer `key` >= low."""
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RequestError(422, f"field {key!r} must be an integer >= {low}, got {_describe(value)}")
    return value


def _describe(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


# ----------------------------------------------------------------------------------------------------------
# The Host header


def host_name(host_header: str) -> str:
    """The name of a Host header without its port: "a.b:80" -> "a.b", "[::1]:80" -> "::1"; lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(bind_host: str) -> list[str]:
    """Bound to loopback: this machine's loopback names (a web page that rebinds its own DNS name to 127.0.0.1
    is refused); bound to a network address: any (set --allowed-hosts to the names the clients use)."""
    if is_loopback(bind_host):
        return sorted({*LOOPBACK_NAMES, host_name(bind_host)})
    return [ANY_HOST]


class HostAllowList:
    """ASGI middleware: a request whose Host header names another host than `hosts` is answered 400 with one
    line, before the app sees it (DNS rebinding: a web page whose name now resolves to this machine)."""

    def __init__(self, app, hosts: list[str], respond):
        self.app, self.hosts, self.respond = app, {host_name(h) for h in hosts}, respond

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and ANY_HOST not in self.hosts:
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(header) not in self.hosts:
                shown = header[:100] or "none"
                await self.respond(400, f"Host header {shown!r} is not one this service answers to; start it "
                                        "with --allowed-hosts NAME to add one", close=True)(scope, receive, send)
                return
        await self.app(scope, receive, send)
