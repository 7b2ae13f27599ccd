"""Failures to acquire (FTA, ISO/IEC 19795-1): images of an evaluation for which no embedding exists, because the
file is missing, does not decode, or shows no usable face. The run goes on; `--fta` says what their pairs count as:

    nonmatch (default)  rejected at every threshold: a genuine pair is a false reject, an impostor pair a true
                        reject; they stay in the TAR / FAR denominators (a deployed system cannot match them either)
    exclude             left out: their pairs leave the denominators (the figures describe the acquired images only)
    error               stop, naming every such file (the old `--bad-images error`)

This module finds them (before any model loads: missing and undecodable; after embedding: no face), stops under
`error`, and writes the report's `failures_to_acquire` section; the protocols move their pairs out of the plan
(`Plan.left_out_*`) and score them by the policy. numpy and PIL only.
"""

from __future__ import annotations

from pathlib import Path

from facetrain.errors import UserError

#: `--fta` choices and what happens to the pairs of an image that failed to acquire.
FTA_POLICIES = {
    "nonmatch": "their pairs are rejected at every threshold (counted as non-matches)",
    "exclude": "their pairs are left out of the figures",
    "error": "stop and name them",
}
DEFAULT_FTA_POLICY = "nonmatch"

#: Kinds of failure, each with what the report says about it.
FTA_PROBLEMS = {
    "missing": "file not found",
    "undecodable": "file does not decode as an image",
    "no_face": "no usable face found by the alignment recipe",
}

REPORT_KEY = "failures_to_acquire"  # read by other tools (model card, bootstrap intervals): never rename
LIST_IN_MESSAGE = 20  # failures named in the one-line error under --fta error; metrics.json lists all
SHOWN_IN_REPORT = 10  # failures named in the printed report


def failure(path: str, problem: str, reason: str, detail: str) -> dict:
    """One failure record: the file, its kind (a key of FTA_PROBLEMS), the finer cause and its detail."""
    return {"path": str(path), "problem": problem, "reason": reason, "detail": detail}


def unreadable(paths: list[str], max_image_pixels: int, what: str) -> list[dict]:
    """Missing and undecodable files among `paths` (the pre-flight's decode check), sorted by path."""
    from facetrain.data.preflight import check_files

    files = list(dict.fromkeys(str(p) for p in paths))
    missing = [p for p in files if not Path(p).is_file()]
    gone = set(missing)
    report = check_files([p for p in files if p not in gone], max_image_pixels, what, progress=False)
    found = [failure(p, "missing", "missing", "no such file") for p in missing]
    found += [failure(b["path"], "undecodable", b["problem"], b["detail"]) for b in report.bad]
    return sorted(found, key=lambda r: r["path"])


def undecodable_images(images: list[bytes], name: str) -> list[dict]:
    """Encoded images (a `.bin` verification set's) that do not decode, as failure records named `<name>[<i>]`
    (with their position, `index`)."""
    from facetrain.data.images import open_image

    found = []
    for i, raw in enumerate(images):
        try:
            with open_image(raw) as im:
                im.load()
        except Exception as err:  # PIL raises many types for damaged data (OSError, SyntaxError, ...)
            found.append({**failure(f"{name}[{i}]", "undecodable", type(err).__name__, str(err)[:200]), "index": i})
    return found


def faceless(records: list[dict]) -> list[dict]:
    """The embedder's alignment failures (`Embedder.last_failures`) as failure records."""
    return [failure(r["path"], "no_face", r["status"], r["reason"]) for r in records]


def embed_acquired(embedder, paths: list[str], unusable: list[dict], num_workers: int | None = None):
    """Embed the `paths` not among `unusable` (`unreadable`'s records), noting the photos without a usable face:
    (the paths embedded, their embeddings in that order -- a faceless photo's row included, to be dropped --, every
    failure record: `unusable` + the faceless ones). verify and identify answer a failure as a non-match."""
    refused = {r["path"] for r in unusable}
    embedded = [p for p in paths if p not in refused]
    if not embedded:
        return embedded, None, list(unusable)
    emb = embedder.embed(embedded, num_workers, record_failures=True)
    return embedded, emb, list(unusable) + faceless(embedder.last_failures)


def stop_if_asked(policy: str, failures: list[dict]) -> None:
    """Under `--fta error`: one line naming the failures (the first LIST_IN_MESSAGE) and the other choices."""
    if policy != "error" or not failures:
        return
    named = ", ".join(f"{r['path']} ({r['reason']})" for r in failures[:LIST_IN_MESSAGE])
    more = f" and {len(failures) - LIST_IN_MESSAGE} more" if len(failures) > LIST_IN_MESSAGE else ""
    raise UserError(f"{len(failures)} image(s) cannot be used (failures to acquire): {named}{more}; fix or remove "
                    "them, or pass --fta nonmatch (count their pairs as non-matches) or --fta exclude (leave their "
                    "pairs out)")


def section(policy: str, attempted: int, failures: list[dict], genuine: int, impostor: int) -> dict:
    """metrics.json's `failures_to_acquire`: rate = failed / attempted images; `genuine_pairs` / `impostor_pairs`:
    the pairs that use a failed image (rejected under nonmatch, left out under exclude)."""
    return {
        "policy": policy,
        "pairs_counted_as": FTA_POLICIES[policy],
        "attempted_images": attempted,
        "count": len(failures),
        "rate": len(failures) / attempted if attempted else 0.0,
        "by_problem": {k: sum(r["problem"] == k for r in failures) for k in FTA_PROBLEMS},
        "genuine_pairs": int(genuine),
        "impostor_pairs": int(impostor),
        "files": failures,
    }


def summary_line(fta: dict) -> str | None:
    """The printed report's line: the rate, the kinds and the first files; None when every image was acquired."""
    if not fta or not fta["count"]:
        return None
    kinds = ", ".join(f"{n} {k}" for k, n in fta["by_problem"].items() if n)
    files = ", ".join(f"{r['path']} ({r['reason']})" for r in fta["files"][:SHOWN_IN_REPORT])
    more = f" and {fta['count'] - SHOWN_IN_REPORT} more" if fta["count"] > SHOWN_IN_REPORT else ""
    return (f"failures to acquire: {fta['count']} of {fta['attempted_images']:,} images (rate {fta['rate']:.4%}; "
            f"{kinds}); {fta['genuine_pairs']:,} genuine / {fta['impostor_pairs']:,} impostor pairs "
            f"{'counted as non-matches' if fta['policy'] == 'nonmatch' else 'left out'}: {files}{more}")
