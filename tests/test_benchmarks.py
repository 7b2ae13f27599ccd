"""insightface `.bin` verification files: the safe reader and `facetrain.eval --benchmarks` end to end.

The files are written here (two tiny sets of synthetic faces, JPEG-encoded as insightface stores them); the model
is a random-weight `test_efficientnet` bundle (tests/test_evaluate.py's `make_bundle`).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_evaluate import _fresh_accelerate_state, cli_error, eval_main, make_bundle  # noqa: F401 (fixture)

from facetrain.data.synthetic import render
from facetrain.errors import UserError
from facetrain.evaluation.benchmarks import read_bin, standard_folds, write_bin
from facetrain.evaluation.metrics import kfold_accuracy


def jpeg(ident: int, index: int, size: int = 112) -> bytes:
    buf = io.BytesIO()
    render(0, ident, index).resize((size, size)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def tiny_set(n_pairs: int = 20, seed: int = 0) -> tuple[list[bytes], list[bool]]:
    """Alternating genuine / impostor pairs of 6 synthetic people (every fold of 10 gets both kinds)."""
    images, issame = [], []
    for k in range(n_pairs):
        same = k % 2 == 0
        a = (k + seed) % 6
        b = a if same else (a + 1 + k % 5) % 6
        images += [jpeg(a, 2 * k), jpeg(b, 2 * k + 1)]
        issame.append(same)
    return images, issame


def python2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """(images, issame) as Python 2's pickle (protocol 2) wrote insightface's files: images as BINSTRING."""
    out = [b"\x80\x02", b"("]
    out += [b"T" + struct.pack("<i", len(x)) + x for x in images]
    out += [b"l", b"("]
    out += [b"\x88" if s else b"\x89" for s in issame]
    out += [b"l", b"\x86", b"."]
    return b"".join(out)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# -------------------------------------------------------------------------------------------- the reader


@pytest.mark.parametrize("writer", ["write_bin", "protocol4", "python2"])
def test_bin_round_trips(tmp_path, writer):
    images, issame = tiny_set(6)
    path = tmp_path / "lfw.bin"
    if writer == "write_bin":  # protocol 2 from Python 3: bytes go through _codecs.encode
        write_bin(path, images, issame)
    elif writer == "protocol4":
        path.write_bytes(pickle.dumps((images, issame), protocol=4))
    else:
        path.write_bytes(python2_pickle(images, issame))
        assert pickle.loads(path.read_bytes(), encoding="bytes") == (images, issame)  # the hand-made stream is valid
    bench = read_bin(path, "LFW")
    assert bench.images == images and bench.issame.tolist() == issame and bench.n_pairs == 6


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps(([b"x", b"y"], [True], _RunsCode(marker)), protocol=2))
    pickle.loads(path.read_bytes())  # the file really runs code when loaded with pickle...
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UserError, match=r"lfw\.bin: not an insightface verification file .*(posix|os)\.system"):
        read_bin(path)  # ...and not with read_bin
    assert not marker.exists()


@pytest.mark.parametrize("payload, why", [
    ((["not bytes", b"y"], [True]), "not a list of encoded image bytes"),
    (([b"x", b"y"], [1]), "issame is not a list of booleans"),
    (([b"x", b"y", b"z"], [True]), "3 images for 1 pairs"),
    ({"bins": []}, "expected a pair"),
])
def test_wrong_shapes_are_one_line_errors(tmp_path, payload, why):
    path = tmp_path / "calfw.bin"
    path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(UserError, match=why):
        read_bin(path)


def test_protocol2_bytes_constructor_only_for_latin1(tmp_path):
    path = tmp_path / "x.bin"  # _codecs.encode with another codec: refused (only the exact call pickle writes)
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00utf_8\x86R.")
    with pytest.raises(UserError, match="_codecs.encode"):
        read_bin(path)


def test_standard_folds_are_ten_consecutive_blocks():
    folds = standard_folds(6000)
    assert folds[0] == 0 and folds[599] == 0 and folds[600] == 1 and folds[-1] == 9
    assert np.bincount(folds).tolist() == [600] * 10


# ------------------------------------------------------------------------------------ facetrain.eval


def test_eval_benchmarks_table_and_metrics_json(tmp_path, capsys):
    bundle = make_bundle(tmp_path / "run" / "bundle")
    bins = tmp_path / "bins"
    bins.mkdir()
    for name, seed in (("lfw.bin", 0), ("cplfw.bin", 3)):
        write_bin(bins / name, *tiny_set(20, seed))
    before = (bundle / "facetrain.json").read_text()
    out = tmp_path / "eval"
    assert eval_main("--model", bundle, "--benchmarks", bins, "--output", out, "--num-workers", 0) == 0
    printed = capsys.readouterr().out
    assert "LFW" in printed and "CPLFW" in printed and "CFP-FP" not in printed and " ± " in printed
    report = json.loads((out / "metrics.json").read_text())
    assert list(report["sets"]) == ["LFW", "CPLFW"]
    lfw = report["sets"]["LFW"]
    assert lfw["n_pairs"] == 20 and lfw["n_genuine"] == 10 and len(lfw["kfold"]["fold_accuracies"]) == 10
    # the same figures from the decoded images written as files and embedded on their own: pairs (2i, 2i+1),
    # ten consecutive folds
    from facetrain.evaluation.embedding import Embedder
    from facetrain.evaluation.scoring import pair_scores

    images, issame = tiny_set(20, 0)
    files = [str(tmp_path / f"{i}.png") for i in range(len(images))]
    for data, file in zip(images, files, strict=True):
        Image.open(io.BytesIO(data)).save(file)
    emb = Embedder.load(bundle, num_workers=0).embed(files, align=False)
    expected = kfold_accuracy(pair_scores(emb[0::2], emb[1::2]), np.array(issame), standard_folds(20))
    assert lfw["kfold"]["fold_accuracies"] == pytest.approx(expected["fold_accuracies"])
    assert lfw["kfold"]["fold_thresholds"] == pytest.approx(expected["fold_thresholds"], abs=1e-6)
    assert (bundle / "facetrain.json").read_text() == before  # never calibrated on a benchmark


def test_eval_benchmarks_errors(tmp_path, capsys):
    bundle = make_bundle(tmp_path / "run" / "bundle")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds none of lfw.bin" in cli_error(eval_main_cli, ["--model", bundle, "--benchmarks", empty], capsys)
    assert "give exactly one" in cli_error(eval_main_cli, ["--model", bundle], capsys)
    marker = tmp_path / "pwned"
    (empty / "agedb_30.bin").write_bytes(pickle.dumps(_RunsCode(marker)))
    err = cli_error(eval_main_cli, ["--model", bundle, "--benchmarks", empty], capsys)
    assert "agedb_30.bin: not an insightface verification file" in err and not marker.exists()
    images, issame = tiny_set(2)
    write_bin(empty / "agedb_30.bin", [*images[:3], b"not an image"], issame)
    err = cli_error(eval_main_cli, ["--model", bundle, "--benchmarks", empty, "--num-workers", 0, "--fta", "error"],
                    capsys)
    assert "failures to acquire): agedb_30.bin[3] (UnsupportedImage)" in err


def eval_main_cli(argv: list[str]) -> int:
    from facetrain import eval as eval_cli

    return eval_cli.main(argv)


# ----------------------------------------------------------------------------- CALFW / CPLFW pairs lists


def eval_pairs(tmp_path: Path, data: Path, pairs: Path) -> dict:
    """`facetrain.eval --pairs` of a tiny bundle over `data`: its metrics.json."""
    bundle = make_bundle(tmp_path / "run" / "bundle")
    out = tmp_path / "eval"
    assert eval_main("--model", bundle, "--data", data, "--pairs", pairs, "--output", out, "--num-workers", 0,
                     "--no-calibrate") == 0
    return json.loads((out / "metrics.json").read_text())


def calfw_folder(tmp_path: Path, n_pairs: int = 20) -> tuple[Path, Path]:
    """A flat folder of aligned images and its pairs list: lines 2i and 2i+1 are pair i, label 0 = impostor."""
    images = tmp_path / "aligned images"
    images.mkdir()
    lines = []
    data, issame = tiny_set(n_pairs)
    for k, same in enumerate(issame):
        for j in range(2):
            name = f"Person_{k:02d}_{j + 1:04d}.jpg"
            (images / name).write_bytes(data[2 * k + j])
            lines.append(f"{name} {k + 1 if same else 0}")
    pairs = tmp_path / "pairs_CALFW.txt"
    pairs.write_text("\n".join(lines) + "\n")
    return images, pairs


def test_calfw_pairs_list_parses_and_evaluates(tmp_path, capsys):
    from facetrain.evaluation.pairfile import read_pairs

    images, pairs = calfw_folder(tmp_path)
    specs = read_pairs(pairs, images)
    assert len(specs) == 20 and [s.genuine for s in specs] == [k % 2 == 0 for k in range(20)]
    assert [s.fold for s in specs] == standard_folds(20).tolist() and specs[3].line == 7
    assert specs[0].path_a == images / "Person_00_0001.jpg" and specs[0].name_a == "Person_00"

    report = eval_pairs(tmp_path, images, pairs)
    assert report["metrics"]["n_genuine"] == 10 and len(report["kfold"]["fold_accuracies"]) == 10


def test_calfw_pairs_list_errors(tmp_path):
    from facetrain.evaluation.pairfile import read_pairs

    images, pairs = calfw_folder(tmp_path, 2)
    (images / "Person_01_0002.jpg").unlink()
    with pytest.raises(UserError, match=r"pairs_CALFW.txt:4: image Person_01_0002.jpg not found"):
        read_pairs(pairs, images)
    pairs.write_text("Person_00_0001.jpg 1\nPerson_00_0002.jpg one\n")
    with pytest.raises(UserError, match=r"pairs_CALFW.txt:2: malformed line 'Person_00_0002.jpg one'"):
        read_pairs(pairs, images)


# ------------------------------------------------------------------------------- CFP-FP's Protocol folder


def cfp_folder(tmp_path: Path, folds: int = 10) -> tuple[Path, Path]:
    """A CFP layout: Data/Images/<id>/{frontal,profile}/NN.jpg, Protocol/Pair_list_{F,P}.txt and
    Protocol/Split/FP/<fold>/{same,diff}.txt with one genuine and one impostor pair per fold."""
    root = tmp_path / "cfp-dataset"
    lists = {"F": [], "P": []}
    for person in range(1, 4):
        for view, key in (("frontal", "F"), ("profile", "P")):
            folder = root / "Data" / "Images" / f"{person:03d}" / view
            folder.mkdir(parents=True)
            for k in (1, 2):
                (folder / f"{k:02d}.jpg").write_bytes(jpeg(person, k + (10 if key == "P" else 0)))
                lists[key].append(f"{len(lists[key]) + 1} ../Data/Images/{person:03d}/{view}/{k:02d}.jpg")
    protocol = root / "Protocol"
    protocol.mkdir()
    for key, lines in lists.items():
        (protocol / f"Pair_list_{key}.txt").write_text("\n".join(lines) + "\n")
    for fold in range(1, folds + 1):
        split = protocol / "Split" / "FP" / f"{fold:02d}"
        split.mkdir(parents=True)
        person = fold % 3  # frontal image 2p+1 and profile image 2p+2 show person p+1
        (split / "same.txt").write_text(f"{2 * person + 1},{2 * person + 2}\n")
        (split / "diff.txt").write_text(f"{2 * person + 1},{(2 * person + 2) % 6 + 1}\n")
    return root, protocol


def test_cfp_fp_protocol_folder_parses_and_evaluates(tmp_path):
    from facetrain.evaluation.pairfile import read_pairs

    root, protocol = cfp_folder(tmp_path)
    specs = read_pairs(protocol, root)
    assert [s.fold for s in specs] == [k // 2 for k in range(20)]
    assert [s.genuine for s in specs] == [True, False] * 10
    first = specs[2]  # folder 02: frontal image 5 and profile image 6, both of person 003
    assert first.path_a == root / "Data/Images/003/frontal/01.jpg"
    assert first.path_b == root / "Data/Images/003/profile/02.jpg"
    assert first.name_a == first.name_b == "003" and specs[3].name_a != specs[3].name_b

    report = eval_pairs(tmp_path, root, protocol)
    assert report["metrics"]["n_genuine"] == 10 and len(report["kfold"]["fold_accuracies"]) == 10

    (protocol / "Split" / "FP" / "03" / "diff.txt").write_text("1,99\n")
    with pytest.raises(UserError, match=r"03/diff.txt:1: '1,99' is not '<frontal number>,<profile number>'"):
        read_pairs(protocol, root)
