"""The pictures of an evaluation (facetrain/evaluation/pictures.py): the worst pairs found during scoring against
brute force, errors.png's layout, the projector's files and config. The end-to-end checks ride on runs other
tests make anyway: facetrain.eval in tests/test_evaluate.py, training in tests/test_trackers.py and
tests/test_train.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from facetrain.evaluation import pictures
from facetrain.evaluation.scoring import WorstPairs, all_pairs_roc


def brute_force_worst(emb: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[list, list]:
    """(genuine, impostor) worst pairs as [(i, j)], i < j, from the full float64 score matrix."""
    x = torch.nn.functional.normalize(emb.double(), dim=1)
    scores = (x @ x.T).numpy()
    i, j = np.triu_indices(len(emb), 1)
    s, same = scores[i, j], labels.numpy()[i] == labels.numpy()[j]
    low = np.argsort(s[same], kind="stable")[:k]
    high = np.argsort(-s[~same], kind="stable")[:k]
    return (list(zip(i[same][low].tolist(), j[same][low].tolist(), strict=True)),
            list(zip(i[~same][high].tolist(), j[~same][high].tolist(), strict=True)))


def clustered(n: int, ids: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, ids, (n,), generator=gen)
    return torch.randn(ids, 16, generator=gen)[labels] + torch.randn(n, 16, generator=gen), labels


@pytest.mark.parametrize("mode", ["exact", "histogram"])
@pytest.mark.parametrize("n, k, block", [(300, 7, 4096), (300, 7, 37), (40, 60, 5)])
def test_worst_pairs_found_while_scoring_are_the_brute_force_worst(mode, n, k, block):
    # several blocks (histogram mode: rows sorted by label and mapped back), diagonal blocks, and k larger than
    # a block or than the number of genuine pairs
    emb, labels = clustered(n, 12, seed=n + block)
    worst = WorstPairs(k)
    all_pairs_roc(emb, labels, mode=mode, block_size=block, worst=worst)
    genuine, impostor = brute_force_worst(emb, labels, k)
    assert list(zip(worst.genuine[1].tolist(), worst.genuine[2].tolist(), strict=True)) == genuine
    assert list(zip(worst.impostor[1].tolist(), worst.impostor[2].tolist(), strict=True)) == impostor
    x = torch.nn.functional.normalize(emb.double(), dim=1)
    for score, i, j in zip(*worst.genuine, strict=True):
        assert score == pytest.approx(float(x[i] @ x[j]), abs=1e-6)


def test_worst_listed_pairs_keep_the_list_order_of_each_pair():
    scores = np.array([0.9, 0.1, 0.5, 0.8, 0.3])
    genuine = np.array([True, True, False, False, True])
    worst = WorstPairs(2)
    worst.add_pairs(scores, genuine, np.array([4, 0, 1, 2, 3]), np.array([0, 5, 6, 7, 8]))
    assert worst.genuine[0].tolist() == [0.1, 0.3] and worst.genuine[1].tolist() == [0, 3]
    assert worst.impostor[0].tolist() == [0.8, 0.5] and worst.impostor[2].tolist() == [7, 6]


def test_report_marks_what_the_threshold_gets_wrong():
    worst = WorstPairs(3)
    worst.add_pairs(np.array([0.2, 0.7, 0.6, 0.4]), np.array([True, True, False, False]),
                    np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7]))
    files = [f"/d/p{k}/img{k}.png" for k in range(8)]
    report = pictures.worst_pairs_report(worst, files, threshold=0.5)
    assert [(p["score"], p["wrong"]) for p in report["genuine"]] == [(0.2, True), (0.7, False)]
    assert [(p["score"], p["wrong"]) for p in report["impostor"]] == [(0.6, True), (0.4, False)]
    assert report["genuine"][0]["a"] == files[0] and report["impostor"][0]["rows"] == [2, 6]
    assert pictures.worst_pairs_report(worst, files, None)["genuine"][0]["wrong"] is None


def test_error_grid_has_its_computed_size_and_marks_wrong_pairs_red():
    worst = WorstPairs(5)
    worst.add_pairs(np.array([0.1, 0.2, 0.9, 0.95, 0.3]), np.array([True, True, False, False, False]),
                    np.arange(5), np.arange(5, 10))
    report = pictures.worst_pairs_report(worst, [f"person{k}/{k:03d}.png" for k in range(10)], threshold=0.5)
    grey = {row: Image.new("L", (50, 40), 20 * row) for row in range(10)}  # gray, not square: cropped, RGB
    grid = pictures.error_grid(report, grey.__getitem__)
    assert grid.size == pictures.grid_size(2, 3) and grid.mode == "RGB"
    # the first genuine pair is wrong (0.1 < 0.5): its frame is the WRONG colour
    frame = np.asarray(grid)[pictures.LINE_PX + pictures.PAD_PX + 1, pictures.PAD_PX + 20]
    assert tuple(frame) == pictures.WRONG_COLOUR
    assert pictures.short_name("/a/very/long/identity_folder_name/and_a_long_file_name.png").count("...") == 1
    assert pictures.short_name("/data/p1/0001.jpg") == "p1/0001.jpg"


def test_projector_sample_is_even_and_bounded_and_earlier_entries_survive(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    assert pictures.projector_rows(5).tolist() == [0, 1, 2, 3, 4]
    rows = pictures.projector_rows(10_000)
    assert len(rows) == pictures.PROJECTOR_MAX and rows[0] == 0 and rows[-1] == 9_999
    faces = {k: Image.new("RGB", (40, 40), (k, 0, 0)) for k in range(6)}
    projector = pictures.Projector.build(torch.randn(6, 4), ["a\tb"] * 6, [f"x/{k}.png" for k in range(6)],
                                         faces.__getitem__)
    assert projector.thumbnails.shape == (6, 3, pictures.PROJECTOR_THUMB_PX, pictures.PROJECTOR_THUMB_PX)
    for tag in ("validation", "eval"):  # two writers on one log dir: the second keeps the first's entry
        writer = SummaryWriter(tmp_path)
        projector.log(writer, 3, tag)
        writer.close()
    config = (tmp_path / "projector_config.pbtxt").read_text()
    assert '"validation:00003"' in config and '"eval:00003"' in config
    lines = (tmp_path / "00003" / "eval" / "metadata.tsv").read_text().splitlines()
    assert lines == ["identity\tfile"] + ["a b\tx/" + f"{k}.png" for k in range(6)]
    assert Image.open(tmp_path / "00003" / "eval" / "sprite.png").size == (3 * 32, 3 * 32)
