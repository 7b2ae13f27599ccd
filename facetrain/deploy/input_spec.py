"""The input of a third-party face model, which its ONNX file does not state: side, channel order, value range
and mean/std, given as one string ("size=112,order=rgb,range=0-255[,mean=A:B:C,std=A:B:C]") by `--input-spec`
or `distill.teacher_input`, parsed here (torch-free, so a command can check it before any heavy work).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from facetrain.errors import UserError
from facetrain.model.files import INPUT_SPEC_EXAMPLE

SPEC_FORMS = f"e.g. {INPUT_SPEC_EXAMPLE}, or size=112,order=bgr,mean=0.5:0.5:0.5,std=0.5:0.5:0.5"
CHANNELS = 3  # RGB (or BGR) images; a gray model is not a face teacher here


@dataclass(frozen=True)
class InputSpec:
    """How an image in [0, 1] becomes a third-party model's input: resized to `size` x `size` px, channels in
    `order`, values mapped linearly onto `value_range`, then (v - mean) / std per channel (in that order)."""

    size: int
    order: str = "rgb"
    value_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    def describe(self) -> str:
        lo, hi = self.value_range
        text = f"size={self.size},order={self.order},range={lo:g}-{hi:g}"
        if any(self.mean) or any(s != 1 for s in self.std):
            text += f",mean={':'.join(f'{m:g}' for m in self.mean)},std={':'.join(f'{s:g}' for s in self.std)}"
        return text

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(N, 3, size, size) float RGB in [0, 1] -> the model's input, float32."""
        if self.order == "bgr":
            x = x[:, ::-1]
        lo, hi = self.value_range
        mean = np.asarray(self.mean, np.float32)[None, :, None, None]
        std = np.asarray(self.std, np.float32)[None, :, None, None]
        return np.ascontiguousarray(((lo + x * (hi - lo)) - mean) / std, dtype=np.float32)


def _channels(text: str, key: str, option: str, positive: bool) -> tuple[float, ...]:
    values = tuple(_number(v, key, option) for v in text.split(":"))
    if len(values) == 1:
        values *= CHANNELS
    if len(values) != CHANNELS or (positive and min(values) <= 0):
        raise UserError(f"{option}: {key}={text} must be one number or {CHANNELS} separated by ':'"
                        f"{' (all > 0)' if positive else ''}; {SPEC_FORMS}")
    return values


def _number(text: str, key: str, option: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{option}: {key}: {text!r} is not a number; {SPEC_FORMS}") from None


def _size(text: str, option: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"{option}: size={text} must be a positive whole number of pixels; {SPEC_FORMS}")
    return int(text)


def _order(text: str, option: str) -> str:
    if text.lower() not in ("rgb", "bgr"):
        raise UserError(f"{option}: order={text} must be rgb or bgr; {SPEC_FORMS}")
    return text.lower()


def _range(text: str, option: str) -> tuple[float, float]:
    found = re.fullmatch(r"(-?[0-9.]+)-(-?[0-9.]+)", text)
    if not found:
        raise UserError(f"{option}: range={text} must be LOW-HIGH, e.g. 0-255, 0-1 or -1-1; {SPEC_FORMS}")
    lo, hi = (_number(v, "range", option) for v in found.groups())
    if hi <= lo:
        raise UserError(f"{option}: range={text}: HIGH must be above LOW; {SPEC_FORMS}")
    return lo, hi


SPEC_KEYS = {  # key -> (InputSpec field, parser(text, option))
    "size": ("size", _size),
    "order": ("order", _order),
    "range": ("value_range", _range),
    "mean": ("mean", lambda text, option: _channels(text, "mean", option, positive=False)),
    "std": ("std", lambda text, option: _channels(text, "std", option, positive=True)),
}


def parse_input_spec(text: str, option: str = "--input-spec") -> InputSpec:
    """"size=112,order=rgb,range=0-255[,mean=A:B:C,std=A:B:C]" -> InputSpec; size is required."""
    fields = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        key, sep, value = item.partition("=")
        if not sep or key.strip().lower() not in SPEC_KEYS:
            raise UserError(f"{option}: {item!r} is not KEY=VALUE with KEY one of {', '.join(SPEC_KEYS)}; "
                            f"{SPEC_FORMS}")
        name, parse = SPEC_KEYS[key.strip().lower()]
        fields[name] = parse(value.strip(), option)
    if "size" not in fields:
        raise UserError(f"{option}: {text!r} gives no size (the model's input side in pixels); {SPEC_FORMS}")
    return InputSpec(**fields)
