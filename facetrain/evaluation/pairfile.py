"""Pairs files: LFW's ``pairs.txt`` (:func:`parse_lfw_pairs`, each listed image found under the data root by
:func:`resolve_pair_paths`) and CALFW's / CPLFW's ``pairs_CALFW.txt`` / ``pairs_CPLFW.txt``
(:func:`parse_two_line_pairs`) and CFP's Protocol folder for CFP-FP (:func:`parse_cfp_fp`); :func:`read_pairs`
tells them apart. Scored with `scoring.pair_scores`; the fold
accuracy is `metrics.kfold_accuracy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from facetrain.data.images import IMAGE_EXTENSIONS, is_image_file  # tried in order for LFW pair names
from facetrain.evaluation.benchmarks import standard_folds
from facetrain.evaluation.metrics import MetricsError


@dataclass(frozen=True)
class PairSpec:
    """One line of an LFW-style pairs file. Images are ``<root>/<name>/<name>_<index:04d>.<ext>``.

    ``path_a``/``path_b`` are None until :func:`resolve_pair_paths` fills them in.
    """

    name_a: str
    index_a: int
    name_b: str
    index_b: int
    genuine: bool
    fold: int
    line: int  # 1-based line number in ``source``
    source: str = ""  # the pairs file, for error messages
    path_a: Path | None = None
    path_b: Path | None = None


def _parse_count(token: str) -> int | None:
    """A non-negative decimal integer, or None (ASCII digits only: str.isdigit accepts '²')."""
    return int(token) if token.isascii() and token.isdigit() else None


def _parse_pair_line(parts: list[str]) -> tuple[str, int, str, int, bool] | None:
    """``(name_a, index_a, name_b, index_b, genuine)`` from a split pair line, or None if malformed."""
    if len(parts) == 3:  # name i j: two images of one person
        name_a, idx_a, name_b, idx_b, genuine = parts[0], parts[1], parts[0], parts[2], True
    elif len(parts) == 4:  # name1 i name2 j: two people
        name_a, idx_a, name_b, idx_b, genuine = parts[0], parts[1], parts[2], parts[3], False
    else:
        return None
    index_a, index_b = _parse_count(idx_a), _parse_count(idx_b)
    if index_a is None or index_b is None:
        return None
    return name_a, index_a, name_b, index_b, genuine


def parse_lfw_pairs(path: str | Path) -> list[PairSpec]:
    """Parse an LFW ``pairs.txt``.

    Line 1 is ``<folds> <n>`` (e.g. ``10 300``; a lone ``<n>`` means one fold, as in ``pairsDevTest.txt``).
    Each fold is n genuine lines ``name i j`` then n impostor lines ``name1 i name2 j``. Folds are assigned
    by position (pair p belongs to fold ``p // (2n)``), so files that interleave genuine and impostor lines
    differently within a fold are accepted too. Blank lines are ignored. Errors are one-line ValueErrors
    naming ``file:line``.
    """
    path = Path(path)
    lines = path.read_text().splitlines()
    header = lines[0].split() if lines else []
    sizes = [_parse_count(token) for token in header]
    if len(sizes) not in (1, 2) or any(size is None or size == 0 for size in sizes):
        shown = repr(lines[0].strip()) if lines else "(empty file)"
        raise MetricsError(
            f"{path}:1: malformed header {shown}: expected '<folds> <pairs per class>', e.g. '10 300'"
        )
    n_folds, per_class = (1, int(header[0])) if len(header) == 1 else (int(header[0]), int(header[1]))

    pairs: list[PairSpec] = []
    for line_no, text in enumerate(lines[1:], start=2):
        parts = text.split()
        if not parts:
            continue
        parsed = _parse_pair_line(parts)
        if parsed is None:
            raise MetricsError(
                f"{path}:{line_no}: malformed pair line {text.strip()!r}: expected 'name i j' (genuine) or "
                "'name1 i name2 j' (impostor) with non-negative integer indices"
            )
        name_a, index_a, name_b, index_b, genuine = parsed
        pairs.append(
            PairSpec(
                name_a=name_a,
                index_a=index_a,
                name_b=name_b,
                index_b=index_b,
                genuine=genuine,
                fold=len(pairs) // (2 * per_class),
                line=line_no,
                source=str(path),
            )
        )
    expected = n_folds * 2 * per_class
    if len(pairs) != expected:
        raise MetricsError(
            f"{path}:1: header {lines[0].strip()!r} promises {n_folds} folds x {2 * per_class} pairs = "
            f"{expected} pairs, but the file has {len(pairs)}"
        )
    return pairs


def resolve_pair_paths(
    pairs: Sequence[PairSpec],
    root: str | Path,
    exts: Sequence[str] = IMAGE_EXTENSIONS,
    missing_ok: bool = False,
) -> list[PairSpec]:
    """Return copies of ``pairs`` with ``path_a``/``path_b`` set to existing files under ``root``.

    Each ``(name, index)`` is looked up once, trying ``exts`` in order (and their upper-case forms). A
    missing image raises a one-line ValueError naming the pairs-file line and the expected path, or with
    ``missing_ok`` gets that expected path (the evaluation counts it as a failure to acquire).
    """
    root = Path(root)
    found: dict[tuple[str, int], Path] = {}

    def lookup(name: str, index: int, pair: PairSpec) -> Path:
        key = (name, index)
        if key not in found:
            stem = f"{name}_{index:04d}"
            folder = root / name
            candidates = (folder / f"{stem}{ext}" for e in exts for ext in dict.fromkeys((e, e.upper())))
            path = next((p for p in candidates if p.is_file()), None)
            if path is None and missing_ok:
                path = folder / f"{stem}{exts[0]}"
            if path is None:
                where = f"{pair.source}:{pair.line}" if pair.source else f"line {pair.line}"
                raise MetricsError(
                    f"{where}: image {stem} not found: expected {folder / stem}{exts[0]} "
                    f"(also tried {', '.join(exts[1:]) or 'no other extension'})"
                )
            found[key] = path
        return found[key]

    return [
        replace(
            pair,
            path_a=lookup(pair.name_a, pair.index_a, pair),
            path_b=lookup(pair.name_b, pair.index_b, pair),
        )
        for pair in pairs
    ]


def parse_two_line_pairs(path: str | Path, root: str | Path, missing_ok: bool = False) -> list[PairSpec]:
    """Parse CALFW's / CPLFW's pairs list: one ``<image file> <label>`` per line, lines 2i and 2i+1 forming pair
    i, genuine when the first line's label is not 0; the images lie in ``root`` itself (their "aligned images"
    folder). The 10 folds are consecutive blocks (600 pairs each in the published 6,000). A malformed line or a
    missing image is a one-line error naming ``file:line``."""
    path, root = Path(path), Path(root)
    rows = []
    for line_no, text in enumerate(path.read_text().splitlines(), start=1):
        parts = text.split()
        if not parts:
            continue
        if len(parts) != 2 or not is_image_file(parts[0]) or _parse_count(parts[1]) is None:
            raise MetricsError(f"{path}:{line_no}: malformed line {text.strip()!r}: expected '<image file> <label>' "
                               "(CALFW / CPLFW pairs list, label 0 = different people)")
        if not missing_ok and not (root / parts[0]).is_file():
            raise MetricsError(f"{path}:{line_no}: image {parts[0]} not found: expected {root / parts[0]}")
        rows.append((parts[0], _parse_count(parts[1]), line_no))
    if not rows or len(rows) % 2:
        raise MetricsError(f"{path}: {len(rows)} image lines: a pairs list needs an even number (2 per pair)")
    folds = standard_folds(len(rows) // 2)
    return [PairSpec(name_a=_person(a[0]), index_a=0, name_b=_person(b[0]), index_b=0, genuine=a[1] != 0,
                     fold=int(folds[k]), line=a[2], source=str(path), path_a=root / a[0], path_b=root / b[0])
            for k, (a, b) in enumerate(zip(rows[0::2], rows[1::2], strict=True))]


def _person(file: str) -> str:
    """``Abel_Pacheco_0004.jpg`` -> ``Abel_Pacheco`` (the identity, for counting people)."""
    stem = Path(file).stem
    head, _, tail = stem.rpartition("_")
    return head if head and tail.isdigit() else stem


CFP_SPLITS = "Split/FP"
"""CFP-FP inside CFP's Protocol folder: one sub-folder per fold (01 ... 10), each with same.txt and diff.txt."""
CFP_LISTS = {"frontal": "Pair_list_F.txt", "profile": "Pair_list_P.txt"}
"""CFP's image lists inside its Protocol folder: ``<number> <path>`` per line, the paths relative to Protocol."""


def _cfp_list(path: Path, root: Path) -> dict[int, Path]:
    """number -> image file of one CFP image list (``1 ../Data/Images/001/frontal/01.jpg``), under ``root``."""
    images = {}
    for line_no, text in enumerate(path.read_text().splitlines(), start=1):
        parts = text.split()
        if not parts:
            continue
        if len(parts) != 2 or _parse_count(parts[0]) is None:
            raise MetricsError(f"{path}:{line_no}: malformed line {text.strip()!r}: expected '<number> <image path>'")
        images[int(parts[0])] = root / parts[1].replace("\\", "/").removeprefix("../")
    return images


def parse_cfp_fp(protocol: str | Path, root: str | Path, missing_ok: bool = False) -> list[PairSpec]:
    """CFP-FP's 10 folds from CFP's ``Protocol`` folder: in fold folder k, each ``a,b`` line of same.txt
    (genuine) and diff.txt (impostor) pairs frontal image a with profile image b. The lists' ``../Data/...``
    paths are taken under ``root`` (the CFP folder that holds Data/ and Protocol/)."""
    protocol, root = Path(protocol), Path(root)
    frontal, profile = (_cfp_list(protocol / CFP_LISTS[k], root) for k in ("frontal", "profile"))
    folders = sorted(p for p in (protocol / CFP_SPLITS).iterdir() if p.is_dir())
    pairs = []
    for fold, folder in enumerate(folders):
        for file, genuine in (("same.txt", True), ("diff.txt", False)):
            for line_no, text in enumerate((folder / file).read_text().splitlines(), start=1):
                numbers = [_parse_count(t) for t in text.replace(",", " ").split()]
                if not numbers:
                    continue
                if len(numbers) != 2 or numbers[0] not in frontal or numbers[1] not in profile:
                    raise MetricsError(f"{folder / file}:{line_no}: {text.strip()!r} is not '<frontal number>,"
                                       f"<profile number>' of {CFP_LISTS['frontal']} / {CFP_LISTS['profile']}")
                a, b = frontal[numbers[0]], profile[numbers[1]]
                for image in (a, b):
                    if not missing_ok and not image.is_file():
                        raise MetricsError(f"{folder / file}:{line_no}: image not found: {image}")
                pairs.append(PairSpec(name_a=a.parent.parent.name, index_a=numbers[0], name_b=b.parent.parent.name,
                                      index_b=numbers[1], genuine=genuine, fold=fold, line=line_no,
                                      source=str(folder / file), path_a=a, path_b=b))
    return pairs


def read_pairs(path: str | Path, root: str | Path, missing_ok: bool = False) -> list[PairSpec]:
    """The pairs of an LFW ``pairs.txt``, a CALFW / CPLFW pairs list (told apart by the first line: LFW's is
    a header of counts, theirs names an image file) or CFP's Protocol folder (CFP-FP), with every image path
    resolved under ``root``. A listed image that is not there is a one-line error, or with ``missing_ok`` the
    path where it was expected."""
    if Path(path).is_dir():
        if not (Path(path) / CFP_SPLITS).is_dir():
            raise MetricsError(f"--pairs: {path} is a folder but not CFP's Protocol folder (no {CFP_SPLITS} in it): "
                               "give a pairs file, or CFP's Protocol folder")
        return parse_cfp_fp(path, root, missing_ok)
    first = next((line.split() for line in Path(path).read_text().splitlines() if line.strip()), [])
    if first and is_image_file(first[0]):
        return parse_two_line_pairs(path, root, missing_ok)
    return resolve_pair_paths(parse_lfw_pairs(path), root, missing_ok=missing_ok)
