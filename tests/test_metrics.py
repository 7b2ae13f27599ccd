"""Tests for facetrain.evaluation.metrics: pair enumeration, exact and histogram ROCs, summary metrics, LFW protocol."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from facetrain.evaluation.metrics import (
    ScoreHistogram,
    best_accuracy_threshold,
    count_pairs,
    kfold_accuracy,
    roc_exact,
    verification_metrics,
)
from facetrain.evaluation.pairfile import PairSpec, parse_lfw_pairs, resolve_pair_paths
from facetrain.evaluation.scoring import all_pair_scores, all_pairs_roc, pair_scores


def _scores_and_flags(genuine: list[float], impostor: list[float]) -> tuple[np.ndarray, np.ndarray]:
    scores = np.array(genuine + impostor, dtype=np.float64)
    flags = np.array([True] * len(genuine) + [False] * len(impostor))
    return scores, flags


def _clustered_embeddings(n: int, n_ids: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity centres plus noise: genuine and impostor score distributions overlap but differ."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_ids, (n,), generator=gen)
    centres = torch.randn(n_ids, dim, generator=gen)
    emb = centres[labels] + 1.2 * torch.randn(n, dim, generator=gen)
    return torch.nn.functional.normalize(emb, dim=1), labels


# ------------------------------------------------------------------------------------------ pair enumeration


def test_count_pairs_from_class_counts() -> None:
    labels = [0, 0, 0, 1, 1, 2]  # 3 + 1 genuine pairs out of 6*5/2 = 15
    assert count_pairs(labels) == (4, 11)
    assert count_pairs(torch.tensor(labels)) == (4, 11)
    assert count_pairs(np.array([7])) == (0, 0)
    assert count_pairs(np.zeros(0, dtype=np.int64)) == (0, 0)


@pytest.mark.parametrize("block_size", [7, 1, 50, 4096])
def test_all_pair_scores_covers_every_pair_once(block_size: int) -> None:
    rng = np.random.default_rng(0)
    n = 50
    emb = rng.normal(size=(n, 8)) * rng.uniform(0.5, 3.0, size=(n, 1))  # deliberately not normalised
    labels = rng.integers(0, 6, size=n)

    blocks = list(all_pair_scores(torch.from_numpy(emb).float(), torch.from_numpy(labels), block_size))
    scores = np.concatenate([s for s, _ in blocks])
    genuine = np.concatenate([g for _, g in blocks])
    assert all(s.dtype == np.float32 and g.dtype == np.bool_ for s, g in blocks)

    # Brute-force reference: upper triangle of the full cosine matrix, in float64.
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    iu = np.triu_indices(n, k=1)
    ref_scores = (unit @ unit.T)[iu]
    ref_genuine = (labels[:, None] == labels[None, :])[iu]

    # Same number of pairs, same multiset of scores overall and among genuine pairs. With continuous random
    # embeddings pair scores are distinct (typical gaps >> 1e-6), so a duplicated or missing pair would change
    # the sorted arrays by far more than float32 rounding.
    assert scores.shape == (n * (n - 1) // 2,)
    assert genuine.sum() == ref_genuine.sum() == count_pairs(labels)[0]
    np.testing.assert_allclose(np.sort(scores), np.sort(ref_scores), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.sort(scores[genuine]), np.sort(ref_scores[ref_genuine]), rtol=0, atol=1e-6)


def test_pair_scores_rowwise_cosine() -> None:
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 4.0], [-2.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(pair_scores(a, b), [1.0, -1.0, np.sqrt(0.5)], atol=1e-12)


# ----------------------------------------------------------------------------------------------- exact ROC


@pytest.mark.parametrize("decimals", [None, 2])  # 2 decimals: many tied scores
def test_roc_exact_matches_sklearn(decimals: int | None) -> None:
    rng = np.random.default_rng(1)
    genuine = rng.random(3000) < 0.3
    scores = rng.normal(size=3000) + 1.0 * genuine
    if decimals is not None:
        scores = np.round(scores, decimals)

    roc = roc_exact(scores, genuine)
    far, tar, thresholds = roc_curve(genuine, scores, drop_intermediate=False)
    np.testing.assert_array_equal(roc.far, far)
    np.testing.assert_array_equal(roc.tar, tar)
    np.testing.assert_array_equal(roc.thresholds[1:], thresholds[1:])
    assert roc.thresholds[0] == np.inf
    assert (roc.n_genuine, roc.n_impostor) == (genuine.sum(), (~genuine).sum())
    assert (roc.mode, roc.bin_width) == ("exact", 0.0)

    metrics = verification_metrics(roc)
    assert metrics["auc"] == pytest.approx(roc_auc_score(genuine, scores), abs=1e-9)


def test_eer_exact_crossing_at_a_roc_point() -> None:
    # Threshold 0.65 accepts 0.7, 0.8, 0.9 and the 0.65 impostor: FAR = 1/4 and FRR = 1/4 (0.6 rejected), and
    # the ROC point just above it (threshold 0.7) has FAR = 0 < FRR = 1/4: the crossing is exactly this point.
    scores, genuine = _scores_and_flags([0.6, 0.7, 0.8, 0.9], [0.1, 0.2, 0.3, 0.65])
    metrics = verification_metrics(roc_exact(scores, genuine), target_fars=())
    assert metrics["eer"] == 0.25
    assert metrics["eer_threshold"] == 0.65
    # Accuracy 7/8 at threshold 0.7 (one genuine rejected) and at 0.6 (one impostor accepted): higher wins.
    assert metrics["best_accuracy"] == 0.875
    assert metrics["best_threshold"] == 0.7
    # 15 of the 16 genuine/impostor orderings are right (only 0.6 < 0.65).
    assert metrics["auc"] == pytest.approx(15 / 16, abs=1e-12)


def test_eer_interpolated_between_roc_points() -> None:
    # ROC points (FAR, FRR): threshold 0.8 -> (0, 1/3), threshold 0.7 -> (1/2, 1/3). FAR - FRR goes from -1/3
    # to +1/6, crossing 2/3 of the way along: EER = 2/3 * 1/2 = 1/3, threshold = 0.8 + 2/3 * (0.7 - 0.8).
    scores, genuine = _scores_and_flags([0.5, 0.8, 0.9], [0.1, 0.7])
    metrics = verification_metrics(roc_exact(scores, genuine), target_fars=())
    assert metrics["eer"] == pytest.approx(1 / 3, abs=1e-12)
    assert metrics["eer_threshold"] == pytest.approx(0.8 - 0.1 * 2 / 3, abs=1e-12)


def test_tar_at_far_on_constructed_scores() -> None:
    # 100 impostors: 99 low ones (0 .. 0.49) and one high (0.95). 10 genuine scores.
    impostor = [*(np.arange(99) * 0.005), 0.95]
    genuine = [0.3, 0.6, 0.7, 0.8, 0.9, 0.96, 0.97, 0.98, 0.99, 1.0]
    scores, flags = _scores_and_flags(genuine, impostor)
    metrics = verification_metrics(roc_exact(scores, flags), target_fars=(1e-1, 1e-2, 1e-3), target_far=0.05)

    # FAR <= 1%: one impostor may be accepted (0.95); going down to 0.6 accepts 9 genuine, the next score
    # (0.49, an impostor) would make FAR 2%.
    assert metrics["tar@far=1e-02"] == 0.9
    assert metrics["threshold@far=1e-02"] == 0.6
    # FAR <= 10% allows lowering the threshold to 0.45 but gains no genuine pair: TAR stays 0.9 and the
    # highest threshold reaching it (0.6) is reported.
    assert metrics["tar@far=1e-01"] == 0.9
    assert metrics["threshold@far=1e-01"] == 0.6
    assert (metrics["target_far"], metrics["tar_at_target_far"], metrics["threshold_at_target_far"]) == (
        0.05,
        0.9,
        0.6,
    )
    # 100 impostor pairs cannot resolve FAR = 1e-3.
    assert metrics["tar@far=1e-03"] is None
    assert metrics["threshold@far=1e-03"] is None
    assert len(metrics["tar_unavailable"]) == 1
    assert "1e-03" in metrics["tar_unavailable"][0] and "100 impostor pairs" in metrics["tar_unavailable"][0]

    assert (metrics["n_genuine"], metrics["n_impostor"], metrics["mode"], metrics["bin_width"]) == (
        10,
        100,
        "exact",
        0.0,
    )
    json.dumps(metrics, allow_nan=False)  # strict JSON: no inf/nan anywhere


def test_tar_unavailable_with_too_few_impostors() -> None:
    rng = np.random.default_rng(2)
    scores, genuine = _scores_and_flags(list(rng.random(20) + 0.5), list(rng.random(50)))
    metrics = verification_metrics(roc_exact(scores, genuine))  # default FARs 1e-1 .. 1e-4
    assert metrics["tar@far=1e-01"] is not None  # 50 >= 10 impostor pairs
    for far in ("1e-02", "1e-03", "1e-04"):
        assert metrics[f"tar@far={far}"] is None
        assert metrics[f"threshold@far={far}"] is None
    assert len(metrics["tar_unavailable"]) == 3
    assert all("50 impostor pairs" in reason for reason in metrics["tar_unavailable"])


def test_degenerate_label_sets_raise_clear_errors() -> None:
    emb = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    with pytest.raises(ValueError, match=r"only one identity: no impostor pairs \(15 genuine, 0 impostor\)"):
        all_pairs_roc(emb, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"every identity has a single image"):
        all_pairs_roc(emb, torch.arange(6))
    with pytest.raises(ValueError, match="no genuine pairs"):
        ScoreHistogram(bins=8).roc()  # empty: neither class; genuine is checked first
    with pytest.raises(ValueError, match="NaN"):
        list(all_pair_scores(torch.full((3, 2), float("nan")), torch.tensor([0, 0, 1])))


# ------------------------------------------------------------------------------------------- histogram ROC


def test_histogram_bins_edges_clipping_and_merge() -> None:
    hist = ScoreHistogram(bins=8)  # bin width 0.25, edges -1, -0.75, ..., 0.75
    assert hist.bin_width == 0.25
    # A score equal to an edge belongs to the bin starting there; out-of-range cosines are clipped.
    hist.add(np.array([0.5, 0.25], dtype=np.float32), np.array([True, True]))
    other = ScoreHistogram(bins=8)
    other.add(np.array([0.0, -1.0, 1.0000001, -1.0000001]), np.array([False] * 4))
    hist.merge(other)
    np.testing.assert_array_equal(hist.genuine_counts, [0, 0, 0, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(hist.impostor_counts, [2, 0, 0, 0, 1, 0, 0, 1])

    roc = hist.roc()
    by_threshold = {float(t): (f, r) for t, f, r in zip(roc.thresholds, roc.far, roc.tar, strict=True)}
    assert by_threshold[0.75] == (0.25, 0.0)  # only the clipped 1.0000001 impostor
    assert by_threshold[0.5] == (0.25, 0.5)  # 0.5 >= 0.5 is accepted
    assert by_threshold[0.25] == (0.25, 1.0)
    assert by_threshold[0.0] == (0.5, 1.0)
    assert roc.thresholds[0] == np.inf and (roc.far[-1], roc.tar[-1]) == (1.0, 1.0)
    # Empty bins repeat a point and are dropped: thresholds -0.25 .. -0.75 add nothing.
    assert not set(by_threshold) & {-0.25, -0.5, -0.75}
    with pytest.raises(ValueError, match="merge"):
        hist.merge(ScoreHistogram(bins=16))


def test_histogram_mode_agrees_with_exact_mode() -> None:
    emb, labels = _clustered_embeddings(n=1415, n_ids=50, dim=16, seed=3)  # 1415*1414/2 = 1,000,405 pairs
    exact = all_pairs_roc(emb, labels, mode="exact", block_size=512)
    hist_roc = all_pairs_roc(emb, labels, mode="histogram", block_size=512)
    assert (exact.mode, hist_roc.mode) == ("exact", "histogram")
    assert all_pairs_roc(emb[:100], labels[:100]).mode == "exact"  # auto, 4950 pairs
    assert all_pairs_roc(emb[:100], labels[:100], max_exact_pairs=4949, bins=1024).mode == "histogram"

    scores = np.concatenate([s for s, _ in all_pair_scores(emb, labels, 512)]).astype(np.float64)
    genuine = np.concatenate([g for _, g in all_pair_scores(emb, labels, 512)])
    n_gen, n_imp = count_pairs(labels)
    assert (exact.n_genuine, exact.n_impostor) == (hist_roc.n_genuine, hist_roc.n_impostor) == (n_gen, n_imp)
    hist = ScoreHistogram()
    hist.add(scores, genuine)
    g_frac = hist.genuine_counts / n_gen  # fraction of genuine pairs in each bin
    i_frac = hist.impostor_counts / n_imp
    w = hist.bin_width

    m_exact = verification_metrics(exact, target_fars=(1e-2,))
    m_hist = verification_metrics(hist_roc, target_fars=(1e-2,))
    assert m_hist["bin_width"] == w == 2**-15

    # AUC: only genuine/impostor pairs falling in the same bin lose their order; the trapezoid counts each
    # such pair as 1/2, so |error| <= 1/2 * sum_k g_k * i_k.
    auc_bound = 0.5 * float(np.sum(g_frac * i_frac))
    assert abs(m_hist["auc"] - m_exact["auc"]) <= auc_bound + 1e-12
    assert abs(m_hist["auc"] - m_exact["auc"]) < 1e-3

    # TAR@FAR: every histogram point (threshold at an edge) is also an exact operating point, so the histogram
    # can only lose TAR; it loses at most the genuine pairs between the exact threshold and the next edge up,
    # i.e. those in the exact threshold's bin.
    t_exact = m_exact["threshold@far=1e-02"]
    bin_of_t = int(np.floor((t_exact + 1.0) / w))
    tar_e, tar_h = m_exact["tar@far=1e-02"], m_hist["tar@far=1e-02"]
    assert tar_e - g_frac[bin_of_t] - 1e-12 <= tar_h <= tar_e + 1e-12
    assert tar_e - tar_h < 1e-3
    # ...and the histogram's threshold really meets the FAR target on the raw scores.
    assert np.mean(scores[~genuine] >= m_hist["threshold@far=1e-02"]) <= 1e-2

    # EER: both estimates lie on the exact ROC between the two histogram points bracketing the crossing,
    # which differ by one bin's worth of impostors (in FAR) and of genuine pairs (in FRR).
    eer_bound = float(np.max(np.minimum(g_frac, i_frac)))
    assert abs(m_hist["eer"] - m_exact["eer"]) <= eer_bound + 1e-12
    assert abs(m_hist["eer"] - m_exact["eer"]) < 1e-3
    assert abs(m_hist["eer_threshold"] - m_exact["eer_threshold"]) <= 2 * w
    assert abs(m_hist["best_accuracy"] - m_exact["best_accuracy"]) < 1e-3


# ------------------------------------------------------------------------------------------- LFW protocol


def test_kfold_accuracy_separable_is_perfect() -> None:
    rng = np.random.default_rng(4)
    genuine = np.tile([True] * 30 + [False] * 30, 10)
    scores = np.where(genuine, rng.uniform(0.6, 1.0, 600), rng.uniform(-1.0, 0.4, 600))
    folds = np.repeat(np.arange(10), 60)
    result = kfold_accuracy(scores, genuine, folds)
    assert result["accuracy_mean"] == 1.0 and result["accuracy_std"] == 0.0
    assert result["fold_accuracies"] == [1.0] * 10
    assert all(0.4 < t <= 0.6 for t in result["fold_thresholds"])
    json.dumps(result, allow_nan=False)


def test_kfold_accuracy_takes_threshold_from_other_folds() -> None:
    # Fold 0 separates at any threshold in (0.2, 0.8]; fold 1 in (0.35, 0.45].
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.55, 0.45, 0.3, 0.35])
    genuine = np.array([True, True, False, False, True, True, False, False])
    folds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    result = kfold_accuracy(scores, genuine, folds)
    # Fold 0 is tested with the midpoint of fold 1's gap (0.4): perfect. Fold 1 is tested with the midpoint
    # of fold 0's gap (0.5), which rejects its 0.45 genuine pair: 3/4 - a threshold fitted on fold 1
    # itself would have scored 1.0.
    assert result["fold_thresholds"] == pytest.approx([0.4, 0.5], abs=1e-12)
    assert result["fold_accuracies"] == [1.0, 0.75]
    assert result["accuracy_mean"] == 0.875
    assert result["accuracy_std"] == pytest.approx(0.125, abs=1e-12)


def test_best_accuracy_threshold_handles_ties() -> None:
    # The two 0.5 scores cannot be separated: accepting both gives 2/3, as does rejecting everything; the
    # higher threshold (reject all) wins the tie.
    threshold, accuracy = best_accuracy_threshold(np.array([0.5, 0.5, 0.1]), np.array([True, False, False]))
    assert accuracy == pytest.approx(2 / 3)
    assert 0.5 < threshold < 0.5 + 1e-12


def _write_lfw(tmp_path: Path, text: str, images: list[str]) -> tuple[Path, Path]:
    root = tmp_path / "lfw"
    for rel in images:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()
    pairs_file = tmp_path / "pairs.txt"
    pairs_file.write_text(text)
    return pairs_file, root


_PAIRS_TEXT = """2\t2
Alice\t1\t2
Bob\t1\t3
Alice\t1\tBob\t2
Carol\t1\tBob\t1
Carol\t1\t2

Bob\t2\t3
Alice\t2\tCarol\t2
Bob\t3\tAlice\t1
"""
_IMAGES = [
    "Alice/Alice_0001.jpg",
    "Alice/Alice_0002.jpg",
    "Bob/Bob_0001.jpg",
    "Bob/Bob_0002.jpg",
    "Bob/Bob_0003.png",
    "Carol/Carol_0001.jpg",
    "Carol/Carol_0002.jpeg",
]


def test_parse_lfw_pairs_round_trip(tmp_path: Path) -> None:
    pairs_file, root = _write_lfw(tmp_path, _PAIRS_TEXT, _IMAGES)
    pairs = parse_lfw_pairs(pairs_file)
    assert [(p.name_a, p.index_a, p.name_b, p.index_b) for p in pairs] == [
        ("Alice", 1, "Alice", 2),
        ("Bob", 1, "Bob", 3),
        ("Alice", 1, "Bob", 2),
        ("Carol", 1, "Bob", 1),
        ("Carol", 1, "Carol", 2),
        ("Bob", 2, "Bob", 3),
        ("Alice", 2, "Carol", 2),
        ("Bob", 3, "Alice", 1),
    ]
    assert [p.genuine for p in pairs] == [True, True, False, False] * 2
    assert [p.fold for p in pairs] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [p.line for p in pairs] == [2, 3, 4, 5, 6, 8, 9, 10]  # the blank line 7 is skipped

    resolved = resolve_pair_paths(pairs, root)
    assert resolved[1].path_a == root / "Bob/Bob_0001.jpg" and resolved[1].path_b == root / "Bob/Bob_0003.png"
    assert resolved[4].path_b == root / "Carol/Carol_0002.jpeg"
    assert all(p.path_a is not None and p.path_a.is_file() for p in resolved)
    assert all(p.path_b is not None and p.path_b.is_file() for p in resolved)
    assert pairs[0].path_a is None  # the input is not modified


def test_parse_lfw_pairs_assigns_folds_by_position(tmp_path: Path) -> None:
    text = "2 1\nA 1 B 1\nA 1 2\nB 1 2\nB 2 A 2\n"  # impostor before genuine in fold 0
    pairs_file, _ = _write_lfw(tmp_path, text, [])
    pairs = parse_lfw_pairs(pairs_file)
    assert [(p.genuine, p.fold) for p in pairs] == [(False, 0), (True, 0), (True, 1), (False, 1)]
    assert isinstance(pairs[0], PairSpec)


def test_resolve_pair_paths_names_line_and_expected_path(tmp_path: Path) -> None:
    pairs_file, root = _write_lfw(tmp_path, _PAIRS_TEXT, [i for i in _IMAGES if i != "Carol/Carol_0002.jpeg"])
    pairs = parse_lfw_pairs(pairs_file)
    with pytest.raises(ValueError) as info:
        resolve_pair_paths(pairs, root)
    message = str(info.value)
    assert message.startswith(f"{pairs_file}:6: ")  # first pair using Carol #2
    assert str(root / "Carol" / "Carol_0002.jpg") in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("1 1\nA 1 2\nA 1 B\n", ":3: ", "malformed pair line 'A 1 B'"),
        ("1 1\nA 1 2\nA 1 B 2 extra\n", ":3: ", "malformed pair line"),
        ("1 1\nA one 2\nA 1 B 2\n", ":2: ", "malformed pair line"),
        ("ten 300\n", ":1: ", "malformed header"),
        ("", ":1: ", "malformed header"),
        ("2 1\nA 1 2\nA 1 B 2\n", ":1: ", "promises 2 folds x 2 pairs = 4 pairs, but the file has 2"),
    ],
)
def test_parse_lfw_pairs_errors_name_file_and_line(tmp_path: Path, text: str, where: str, what: str) -> None:
    pairs_file, _ = _write_lfw(tmp_path, text, [])
    with pytest.raises(ValueError) as info:
        parse_lfw_pairs(pairs_file)
    message = str(info.value)
    assert message.startswith(f"{pairs_file}{where}")
    assert what in message
    assert "\n" not in message
