"""What the verification service accepts from a client, and what an accepted image may cost to decode.

`Limits` holds every limit of the service (sizes, counts, timeouts, connections); `/health` reports them
(`Limits.report`) and docs/deploy.md explains them. `fit_decode` is the decode budget: it reads the image
header (PIL's lazy open, no pixel decoded yet), decodes a JPEG over the limits at a reduced DCT scale (PIL's
draft mode, 1/2 to 1/8), and refuses anything that would still decode to more pixels or bytes than allowed.
Nothing here imports torch or FastAPI.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from PIL import Image, ImageMode

#: Base64 turns 3 bytes into 4 characters.
BASE64_CHARS_PER_BYTE = 4 / 3
#: Extra room for each image's base64 in the JSON body: line breaks of MIME-wrapped base64 (CR LF, written
#: "\r\n" in JSON: 4 characters every 76), "\/" escapes, a data: URL prefix. 10 % covers them all.
BASE64_SLACK = 1.10
#: JSON framing of one image field (key, quotes, comma) and of the whole request (threshold, top_k, ...), bytes.
FIELD_FRAMING_BYTES = 1024
REQUEST_FRAMING_BYTES = 4096
#: The scales a JPEG can be decoded at (libjpeg's DCT scaling: 1/1, 1/2, 1/4, 1/8 of each side).
JPEG_DRAFT_SCALES = (1, 2, 4, 8)
#: Bytes per DCT coefficient: a progressive JPEG keeps every coefficient of the full image while decoding,
#: whatever the draft scale (libjpeg's whole-image coefficient buffer).
COEFFICIENT_BYTES = 2
JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a phone's multi-picture JPEG; PIL decodes its first frame as a JPEG


class RequestError(Exception):
    """A bad request: answered with `status` and {"error": message}, never a traceback. `close`: the body was
    not (fully) read, so the connection is closed after the answer rather than reused."""

    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.close = status, message, close


class ClientGone(Exception):
    """The client closed the connection before its request body was complete (an aborted upload)."""

    def __init__(self, path: str, received: int):
        super().__init__(f"{path}: client closed the connection after {received:,} bytes of its request body")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class Limits:
    max_image_bytes: int = 10_000_000
    """Largest image file accepted (bytes, after base64 decoding)."""
    max_pixels: int = 4096 * 4096
    """Largest image decoded (width x height, from the header; a JPEG over it is decoded at 1/2, 1/4 or 1/8 scale
    when that fits). 16.8 MP holds a 12 MP phone photo; a face verifier needs far less (a 112 px crop)."""
    max_images: int = 16
    """Most images in one /embed request."""
    max_decoded_bytes: int = 4096 * 4096 * 3
    """Largest decoded image (width x height x bands x bytes per band, from the header): 48 MiB, a 16.8 MP 8-bit
    RGB image; a 16-bit or RGBA image of that many pixels is over it."""
    decode_workers: int = field(default_factory=usable_cores)
    """Images decoded at the same time (threads); more wait their turn. Default: the usable cores."""
    header_timeout_s: float = 10.0
    """A connection must send a request's headers within this long of opening (or of its previous answer)."""
    body_timeout_s: float = 30.0
    """A request's whole body must arrive within this long of its headers; later: 408."""
    max_connections: int = 256
    """Open connections (and requests in progress) at most; a request over it is answered 503 by uvicorn."""
    max_inflight_bytes: int = 1_000_000_000
    """Request bodies held at once, all requests together (bytes, from the first byte read to the answer); a
    body that would go over it is answered 503 (retry later): the connection cap times /embed's body limit
    would be 60 GB."""

    def endpoint_images(self) -> dict[str, int]:
        """The most images each endpoint's request carries: the size its body limit is made for."""
        return {"/verify": 2, "/embed": self.max_images, "/identify": 1}

    def body_limit(self, images: int) -> int:
        """Largest body of a request with `images` images: their base64 plus JSON framing, bytes."""
        per_image = math.ceil(self.max_image_bytes * BASE64_CHARS_PER_BYTE * BASE64_SLACK) + FIELD_FRAMING_BYTES
        return images * per_image + REQUEST_FRAMING_BYTES

    @property
    def max_body(self) -> int:
        """The largest body any endpoint accepts."""
        return max(self.body_limit(n) for n in self.endpoint_images().values())

    def report(self) -> dict:
        """The limits as /health shows them."""
        return {"max_image_bytes": self.max_image_bytes, "max_pixels": self.max_pixels,
                "max_decoded_bytes": self.max_decoded_bytes, "max_images": self.max_images,
                "max_body_bytes": {path: self.body_limit(n) for path, n in self.endpoint_images().items()},
                "decode_workers": self.decode_workers, "header_timeout_s": self.header_timeout_s,
                "body_timeout_s": self.body_timeout_s, "max_connections": self.max_connections,
                "max_inflight_bytes": self.max_inflight_bytes}


class BodyBudget:
    """The bytes of request bodies the service holds, all requests together, within `limit`. Used on the event
    loop only (no lock). `hold()` is one request's share, returned when the request is answered."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def hold(self) -> Held:
        return Held(self)


class Held:
    def __init__(self, budget: BodyBudget):
        self.budget, self.bytes = budget, 0

    def add(self, n: int) -> None:
        if self.budget.used + n > self.budget.limit:
            raise RequestError(503, f"server busy: {self.budget.used:,} bytes of request bodies are being "
                                    f"handled (limit {self.budget.limit:,}); retry in a moment", close=True)
        self.budget.used += n
        self.bytes += n

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc) -> None:
        self.budget.used -= self.bytes
        self.bytes = 0


# ----------------------------------------------------------------------------------------------------------
# The decode budget


def bytes_per_pixel(mode: str) -> int:
    """Bytes one decoded pixel of PIL `mode` takes: bands x bytes per band ("1" is stored a byte a pixel)."""
    info = ImageMode.getmode(mode)
    return len(info.bands) * int(info.typestr[-1])


def _coefficient_bytes(img: Image.Image) -> int:
    """The whole-image DCT coefficient buffer of a progressive JPEG (0 for a baseline one), bytes: one
    coefficient per sample of every component at its own sampling."""
    if not img.info.get("progressive"):
        return 0
    layers = getattr(img, "layer", None) or [("", 1, 1, 0)] * len(img.getbands())
    h_max, v_max = max(layer[1] for layer in layers), max(layer[2] for layer in layers)
    samples_per_pixel = sum(layer[1] * layer[2] for layer in layers) / (h_max * v_max)
    return int(img.size[0] * img.size[1] * samples_per_pixel * COEFFICIENT_BYTES)


def _cost(width: int, height: int, mode: str, scale: int) -> tuple[int, int]:
    """(pixels, decoded bytes) of an image decoded at 1/scale of each side."""
    w, h = -(-width // scale), -(-height // scale)
    return w * h, w * h * bytes_per_pixel(mode)


def _draft_scale(img: Image.Image, limits: Limits) -> int:
    """The smallest JPEG draft scale at which the decoded image fits the limits (1 if none does: refused)."""
    for scale in JPEG_DRAFT_SCALES:
        pixels, nbytes = _cost(*img.size, img.mode, scale)
        if pixels <= limits.max_pixels and nbytes <= limits.max_decoded_bytes:
            return scale
    return 1


def fit_decode(img: Image.Image, name: str, limits: Limits) -> Image.Image:
    """`img` (opened lazily, no pixel decoded) set to decode within the limits, or RequestError 413. A JPEG over
    them decodes at the smallest DCT scale that fits (its answer then differs slightly from the offline one on
    the full-size file); any other image over them, and a progressive JPEG whose coefficients alone are over the
    byte budget, is refused before a pixel is decoded."""
    width, height = img.size
    coefficients = _coefficient_bytes(img) if img.format in JPEG_FORMATS else 0
    if coefficients > limits.max_decoded_bytes:
        raise RequestError(413, f"{name}: a progressive JPEG of {width}x{height} needs {coefficients:,} bytes to "
                                f"decode, over the limit of {limits.max_decoded_bytes:,}; send a smaller image")
    if img.format in JPEG_FORMATS:
        scale = _draft_scale(img, limits)
        if scale > 1:
            img.draft(img.mode, (width // scale, height // scale))
    pixels, nbytes = _cost(*img.size, img.mode, 1)
    if pixels > limits.max_pixels:
        raise RequestError(413, f"{name}: {width}x{height} = {width * height:,} pixels is over the limit of "
                                f"{limits.max_pixels:,}; send a smaller image")
    if nbytes > limits.max_decoded_bytes:
        raise RequestError(413, f"{name}: {width}x{height} {img.mode} decodes to {nbytes:,} bytes, over the limit "
                                f"of {limits.max_decoded_bytes:,}; send a smaller or 8-bit image")
    return img
