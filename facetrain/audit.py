"""The teacher audits a labelled folder of aligned crops: likely mislabels and identities under two names.

    python -m facetrain.audit --teacher face_recognition_sface_2021dec_int8bq.onnx \\
        --input-spec size=112,order=rgb,range=0-255 --data /data/aligned --output runs/audit
    accelerate launch -m facetrain.train --config configs/small_data.yaml --data.root /data/aligned \\
        --data.exclude runs/audit/audit.json

Every image of <data>/<identity>/<image> is checked by the pre-flight's decode check, then embedded by the
teacher (any file facetrain.deploy.teacher loads: a third-party ONNX with --input-spec, a facetrain export or a
bundle), batched, the images decoded on threads. The statistics are facetrain/data/audit.py: an image whose
cosine to its identity's leave-one-out core centroid is below --max-cosine AND more than --margin below its
identity's median is a likely mislabel (the nearest other identity is named when closer: the likely right
label); two identities whose centroids have a cosine above --duplicate-cosine are likely one person under two
names. The report is printed, and written as <output>/audit.json (every finding, the thresholds, the teacher's
file and sha256, and the "exclude" list that data.exclude reads) and <output>/audit.txt.
"""

from __future__ import annotations

import argparse
import os
import sys

from facetrain.runtime import threads

os.environ.update(threads.wait_policy())  # before torch loads: facetrain/runtime/threads.py
from facetrain.cli import run_cli  # noqa: E402
from facetrain.data.audit import AuditThresholds  # noqa: E402  (numpy only)
from facetrain.errors import UserError  # noqa: E402

LISTED = 20  # rows per list printed on stdout (audit.txt and audit.json have all)


def build_parser():
    from facetrain.cli import ArgumentParser, add_image_check_options

    d = AuditThresholds()
    p = ArgumentParser(prog="facetrain.audit", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="face model: an .onnx file (with --input-spec), a facetrain "
                   "export or a bundle")
    p.add_argument("--input-spec", default=None, help="a third-party ONNX file's input, e.g. "
                   "size=112,order=rgb,range=0-255 (facetrain files state their own)")
    p.add_argument("--data", required=True, help="labelled folder of aligned crops: <data>/<identity>/<image>")
    p.add_argument("--output", default="audit", help="folder for audit.json and audit.txt (default: ./audit)")
    p.add_argument("--max-cosine", type=float, default=d.max_cosine, help="likely mislabel: cosine to its "
                   f"identity's centroid below this (default {d.max_cosine:g})")
    p.add_argument("--margin", type=float, default=d.margin, help="...and this far below its identity's median "
                   f"(default {d.margin:g})")
    p.add_argument("--duplicate-cosine", type=float, default=d.duplicate_cosine, help="likely duplicate "
                   f"identities: centroid cosine above this (default {d.duplicate_cosine:g})")
    p.add_argument("--core-fraction", type=float, default=d.core_fraction, help="the most typical fraction of "
                   f"an identity's other images its centroid is made of (default {d.core_fraction:g})")
    p.add_argument("--batch-size", type=int, default=64, help="images per teacher call (default 64)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default: one per core)")
    add_image_check_options(p, "audit without them (listed in audit.json)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress on stderr")
    return p


def _progress(done: int, total: int) -> None:
    print(f"\rfacetrain.audit: embedded {done:,}/{total:,} images", end="" if done < total else "\n",
          file=sys.stderr, flush=True)


def _teacher_record(args, teacher) -> dict:
    """The teacher in audit.json: the file given, the sha256 of its weights (a bundle's weights file) and how it
    was run."""
    from facetrain.deploy.teacher import describe, teacher_sha256

    return {"file": str(args.teacher), "sha256": teacher_sha256(teacher.path), "description": describe(teacher)}


def run(args) -> dict:
    from facetrain.data import audit
    from facetrain.deploy.teacher import embed_files, load_teacher

    thresholds = AuditThresholds(args.max_cosine, args.margin, args.duplicate_cosine, args.core_fraction)
    thresholds.check()
    if args.batch_size < 1:
        raise UserError(f"--batch-size: must be >= 1, got {args.batch_size}")
    teacher = load_teacher(args.teacher, args.input_spec, args.threads)
    paths, labels, names, refused = audit.checked_folder(args.data, args.max_image_pixels, args.bad_images,
                                                         args.progress)
    emb = embed_files(teacher, paths, args.batch_size, progress=_progress if args.progress else None)
    findings = audit.audit(emb, labels, names, paths, thresholds)
    rep = audit.report(findings, args.data, _teacher_record(args, teacher),
                       audit.exclusions(findings, labels, names, paths, args.data),
                       refused)
    saved = audit.write(rep, args.output)
    print(audit.text(rep, LISTED) + f"(all of it: {saved} and {saved.with_name(audit.REPORT_TEXT)})", flush=True)
    return rep


def main(argv: list[str]) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
