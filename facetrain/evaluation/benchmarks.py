"""The standard verification sets as insightface ships them (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW): reading their
`.bin` files without running any code they might contain.

A `.bin` file is a Python pickle of `(bins, issame)`: `bins` a list of 2N encoded images (JPEG/PNG bytes of
aligned 112x112 crops; Python 2 wrote them as `str`, read back as bytes) and `issame` a list of N booleans; pair
i is `(bins[2i], bins[2i + 1])`. `pickle.load` on such a file runs whatever callable the file names (a
`__reduce__` can call `os.system`), so `read_bin` unpickles with `_DataOnly`, which refuses every global (but
the bytes constructor of Python 3's protocol 2, replaced by a checked function of ours): a pickle of plain
containers, bytes and bools needs none, and nothing can be called without one. The result is then checked to
be exactly that shape. The 10 folds of the standard protocol are consecutive blocks of
pairs (`standard_folds`), as insightface's evaluation splits them.

Torch-free (the layering test checks it): `facetrain.eval --benchmarks DIR` embeds and scores the sets in
`evaluation/benchmark_run.py`.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facetrain.errors import UserError

#: set name -> file name, in the order papers report them; `--benchmarks DIR` evaluates those DIR holds.
BENCHMARK_FILES: dict[str, str] = {
    "LFW": "lfw.bin",
    "CFP-FP": "cfp_fp.bin",
    "AgeDB-30": "agedb_30.bin",
    "CALFW": "calfw.bin",
    "CPLFW": "cplfw.bin",
}

STANDARD_FOLDS = 10
"""Folds of the standard protocol: consecutive blocks of pairs (600 pairs each in LFW's 6,000)."""


def _latin1_bytes(text: object, encoding: object = "latin1") -> bytes:
    """What Python 3's protocol-2 pickles call to rebuild bytes (`_codecs.encode(text, "latin1")`), and nothing
    else: any other argument is refused."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with arguments of types {type(text).__name__}, "
                                     f"{type(encoding).__name__} {encoding!r}")
    return text.encode("latin-1")


_ALLOWED_GLOBALS = {("_codecs", "encode"): _latin1_bytes}
"""The one global a verification file may name: how `pickle.dumps(..., protocol=2)` in Python 3 writes bytes
(Python 2 and protocols >= 3 write them inline). It is replaced by `_latin1_bytes`, never looked up."""


class _DataOnly(pickle.Unpickler):
    """An unpickler that builds only plain data: tuples, lists, dicts, bytes, str, numbers, bools, None.
    Every class or function lookup (the only way a pickle can call code) is refused, except `_ALLOWED_GLOBALS`,
    which maps to our own checked function."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[module, name]
        raise pickle.UnpicklingError(f"refers to {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("uses a persistent id")


@dataclass(frozen=True)
class Benchmark:
    """One verification set: 2N encoded images, pair i = images 2i and 2i+1, `issame[i]` True if genuine."""

    name: str
    path: Path
    images: list[bytes]
    issame: np.ndarray  # (N,) bool

    @property
    def n_pairs(self) -> int:
        return int(self.issame.shape[0])


def _refuse(path: Path, what: str) -> UserError:
    return UserError(f"{path}: not an insightface verification file ({what}); refusing to read it: use the "
                     "lfw.bin / cfp_fp.bin / ... files insightface publishes, or a file made the same way")


def _checked(path: Path, data: object) -> tuple[list[bytes], np.ndarray]:
    """`(bins, issame)` of exactly the types a verification file holds, or a one-line UserError."""
    if not isinstance(data, tuple | list) or len(data) != 2:
        raise _refuse(path, f"expected a pair (images, issame), got {type(data).__name__}")
    bins, issame = data
    if not isinstance(bins, list | tuple) or not all(isinstance(b, bytes | bytearray) for b in bins):
        raise _refuse(path, "the images are not a list of encoded image bytes")
    if not isinstance(issame, list | tuple) or not all(isinstance(s, bool) for s in issame):
        raise _refuse(path, "issame is not a list of booleans")
    if not issame or len(bins) != 2 * len(issame):
        raise _refuse(path, f"{len(bins)} images for {len(issame)} pairs (need 2 per pair, at least one pair)")
    return [bytes(b) for b in bins], np.asarray(issame, dtype=bool)


def read_bin(path: str | Path, name: str = "") -> Benchmark:
    """Read an insightface `.bin` verification file safely (see the module docstring); any other content,
    including a pickle that names a class or function, is a one-line UserError naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    try:
        # encoding="bytes": Python 2's str (how insightface wrote the images) comes back as bytes
        data = _DataOnly(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # truncated or foreign data fails in many ways (EOFError, struct.error, ...): each
        # means "not a verification file", and no code of the file ran
        raise _refuse(path, f"{type(err).__name__}: {err}") from None
    bins, issame = _checked(path, data)
    return Benchmark(name or path.stem, path, bins, issame)


def find_benchmarks(folder: str | Path) -> dict[str, Path]:
    """The standard sets present in `folder`, by name, in `BENCHMARK_FILES` order; a one-line UserError if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--benchmarks: folder not found: {folder}")
    found = {name: folder / file for name, file in BENCHMARK_FILES.items() if (folder / file).is_file()}
    if not found:
        raise UserError(f"--benchmarks: {folder} holds none of {', '.join(BENCHMARK_FILES.values())}: point it at "
                        "the folder of insightface's verification files")
    return found


def standard_folds(n_pairs: int, n_folds: int = STANDARD_FOLDS) -> np.ndarray:
    """Fold id of each pair: `n_folds` consecutive blocks, as equal as the count allows."""
    return np.arange(n_pairs) * n_folds // n_pairs


def write_bin(path: str | Path, images: list[bytes], issame: list[bool]) -> None:
    """Write a verification file in insightface's format (tests, and sets of your own)."""
    Path(path).write_bytes(pickle.dumps((list(images), [bool(s) for s in issame]), protocol=2))
