"""Bootstrap confidence intervals (facetrain/evaluation/bootstrap.py): coverage measured by simulation on score
sets with a known true TAR / FAR and identity structure, the identity bootstrap against the pair bootstrap, and
the counts from real embeddings against the ROC they must reproduce."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import ndtr

from facetrain.errors import UserError
from facetrain.evaluation import bootstrap as bs
from facetrain.evaluation.metrics import count_pairs, verification_metrics
from facetrain.evaluation.scoring import all_pairs_roc, all_pairs_unit_counts

THRESHOLD = 0.45  # cosine: the fixed operating point of the simulations
GRID = np.array([THRESHOLD, -np.inf])  # its bootstrap grid: the threshold, then every pair
REPLICATES = 400  # per simulated evaluation: enough for stable 2.5% / 97.5% percentiles of a smooth statistic


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _metrics_stub(n_impostor: int) -> dict:
    # only the operating point at THRESHOLD is under test; AUC / EER are computed but not checked here
    return {"auc": 0.5, "eer": 0.5, "n_impostor": n_impostor}


# Genuine scores: 0.5 + mu_identity + noise, mu ~ N(0, 0.08), noise ~ N(0, 0.06); people have 2..8 images.
# The identity effect dominates, so the pairs of one person are strongly correlated.
G_MEAN, G_PERSON, G_PAIR = 0.5, 0.08, 0.06
TRUE_TAR = _phi((G_MEAN - THRESHOLD) / math.hypot(G_PERSON, G_PAIR))


def _genuine_set(rng: np.random.Generator, people: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, person of each genuine pair) of one simulated test set."""
    images = rng.integers(2, 9, size=people)
    pairs = images * (images - 1) // 2
    person = np.repeat(np.arange(people), pairs)
    scores = G_MEAN + rng.normal(0.0, G_PERSON, people)[person] + rng.normal(0.0, G_PAIR, person.shape[0])
    return scores, person


def _tar_interval(scores: np.ndarray, person: np.ndarray, unit: str, seed: int) -> list[float]:
    """Interval of TAR at THRESHOLD with identities (or genuine pairs) as the resampled units."""
    people = int(person.max()) + 1
    if unit == "identity":
        above = np.bincount(person, weights=scores >= THRESHOLD, minlength=people)
        genuine = np.stack([above, np.bincount(person, minlength=people)], axis=1).astype(np.float64)
        counts = bs.UnitCounts(GRID, genuine, np.ones((people, 2)), None, np.zeros(people, dtype=np.int64),
                               "identity", people)
    else:  # one unit per genuine pair; a few impostor pairs keep the FAR defined
        s = np.concatenate([scores, np.zeros(people)])
        g = np.concatenate([np.ones(scores.shape[0], bool), np.zeros(people, bool)])
        counts = bs.pair_unit_counts(s, g, None, GRID)
    iv = bs.bootstrap_intervals(counts, _metrics_stub(people), [], THRESHOLD, REPLICATES, 0.95, seed)
    return iv.summary["tar_at_threshold"]


def _coverage(repeats: int, people: int, unit: str) -> float:
    hits = 0
    for seed in range(repeats):
        scores, person = _genuine_set(np.random.default_rng(10_000 + seed), people)
        lo, hi = _tar_interval(scores, person, unit, seed)
        hits += lo <= TRUE_TAR <= hi
    return hits / repeats


@pytest.mark.slow
def test_identity_bootstrap_tar_interval_covers_the_true_tar_95_percent_of_the_time():
    # 1000 simulated test sets of 80 people: the coverage's standard error is 0.7%, so 93-97% is +-3 SE
    coverage = _coverage(1000, 80, "identity")
    assert 0.93 <= coverage <= 0.97, coverage


def test_identity_bootstrap_tar_coverage_quick():
    # the quick loop's version: 250 sets, standard error 1.4%, so a looser band
    coverage = _coverage(250, 80, "identity")
    assert 0.91 <= coverage <= 0.99, coverage


def test_pair_bootstrap_under_covers_on_clustered_pairs():
    # the same sets resampled pair by pair: correlated pairs are counted as independent, the intervals are too
    # narrow (measured: 42% coverage). This is the failure the identity bootstrap exists to avoid, and shows
    # that the coverage check can fail.
    coverage = _coverage(40, 40, "pair")
    assert coverage < 0.8, coverage


# Impostor scores: a_i + a_j + noise for people i != j, a ~ N(0, 0.04) (some people look like many others),
# noise ~ N(0, 0.12); accepted at 0.27: FAR about 2%.
I_PERSON, I_PAIR, I_THRESHOLD = 0.04, 0.12, 0.27
TRUE_FAR = 1.0 - _phi(I_THRESHOLD / math.hypot(math.sqrt(2) * I_PERSON, I_PAIR))


def _impostor_counts(rng: np.random.Generator, people: int) -> bs.UnitCounts:
    """Counts of one simulated set: impostor pairs between people i < j, n_i * n_j of them, accepted or not."""
    images = rng.integers(2, 9, size=people).astype(np.float64)
    effect = rng.normal(0.0, I_PERSON, people)
    pairs = np.triu(np.outer(images, images), k=1)
    p_above = ndtr((effect[:, None] + effect[None, :] - I_THRESHOLD) / I_PAIR)
    above = rng.binomial(pairs.astype(np.int64), p_above).astype(np.float64)
    between = np.stack([above + above.T, pairs + pairs.T], axis=2)  # symmetric: (i, j) and (j, i)
    genuine = np.stack([images, images], axis=1)  # TAR is not under test here
    return bs.UnitCounts(np.array([I_THRESHOLD, -np.inf]), genuine, np.zeros((people, 2)), between,
                         np.zeros(people, dtype=np.int64), "identity", people)


def _far_coverage(repeats: int, people: int) -> float:
    hits = 0
    for seed in range(repeats):
        counts = _impostor_counts(np.random.default_rng(20_000 + seed), people)
        iv = bs.bootstrap_intervals(counts, _metrics_stub(10**6), [], I_THRESHOLD, REPLICATES, 0.95, seed)
        lo, hi = iv.summary["delivered_far"]
        hits += lo <= TRUE_FAR <= hi
    return hits / repeats


@pytest.mark.slow
def test_identity_bootstrap_far_interval_covers_the_true_far():
    # an impostor pair belongs to both of its people (w_i * w_j): 400 sets of 100 people, SE of the coverage 1.1%
    coverage = _far_coverage(400, 100)
    assert 0.93 <= coverage <= 0.97, coverage


def test_identity_bootstrap_far_coverage_quick():
    coverage = _far_coverage(100, 100)
    assert 0.89 <= coverage <= 1.0, coverage


# ------------------------------------------------------------------------------- counts from embeddings


def _embeddings(n: int, people: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, people, (n,), generator=gen)
    centres = torch.randn(people, 16, generator=gen)
    return centres[labels] + 1.2 * torch.randn(n, 16, generator=gen), labels


def _rates(emb, labels, roc, metrics, max_units):
    fixed = [metrics[f"threshold@far={f:.0e}"] for f in (1e-1, 1e-2)] + [metrics["threshold_at_target_far"]]
    grid = bs.threshold_grid(roc, fixed)
    units, n_units = bs.identity_units(labels.numpy(), seed=3, max_units=max_units)
    acc = bs.UnitPairAccumulator(n_units, grid)
    all_pairs_unit_counts(emb, labels, units, acc, block_size=64)  # several blocks, diagonal and off-diagonal
    counts = acc.unit_counts(int(labels.unique().numel()))
    return grid, counts, bs.weighted_rates(counts, np.ones((1, n_units)))


@pytest.mark.parametrize("mode, max_units", [("exact", bs.MAX_UNITS), ("histogram", bs.MAX_UNITS), ("exact", 7)])
def test_unit_counts_with_every_weight_one_reproduce_the_roc(mode, max_units):
    emb, labels = _embeddings(300, 40)
    roc = all_pairs_roc(emb, labels, mode=mode)
    metrics = verification_metrics(roc, target_fars=(1e-1, 1e-2), target_far=3e-3)
    grid, counts, (far, tar) = _rates(emb, labels, roc, metrics, max_units)
    # at each grid threshold, the rates are the ROC's at that threshold, from every pair exactly once
    at = np.searchsorted(-roc.thresholds, -grid[:-1])
    np.testing.assert_allclose(far[0, :-1], roc.far[at], rtol=0, atol=1e-12)
    np.testing.assert_allclose(tar[0, :-1], roc.tar[at], rtol=0, atol=1e-12)
    assert counts.genuine[:, -1].sum() == roc.n_genuine
    total = counts.within[:, -1].sum() + (0 if counts.between is None else counts.between[:, :, -1].sum() / 2)
    assert total == roc.n_impostor
    assert counts.genuine.shape[0] == min(40, max_units)
    # so the reported figures come back exactly with every weight 1, and the intervals hold them
    iv = bs.bootstrap_intervals(counts, metrics, [1e-1, 1e-2], metrics["threshold_at_target_far"], 200, 0.95, 1)
    s = iv.as_dict()
    assert s["unit"] == "identity" and s["units"] == min(40, max_units) and s["replicates"] == 200
    for f in ("1e-01", "1e-02"):
        lo, hi = s["tar_at_far"][f]
        assert lo <= metrics[f"tar@far={f}"] <= hi
    assert s["auc"][0] <= metrics["auc"] <= s["auc"][1] and s["eer"][0] <= metrics["eer"] <= s["eer"][1]
    lo, hi = s["delivered_far"]
    assert lo <= far[0, list(grid).index(metrics["threshold_at_target_far"])] <= hi
    # roc.png's band: pointwise TAR intervals over FAR, around the ROC
    fars, low, high = iv.tar_band(roc.n_impostor, points=20)
    assert fars[0] == pytest.approx(1 / roc.n_impostor) and fars[-1] == 1.0 and (low <= high).all()
    assert low[-1] == high[-1] == 1.0
    grid_far, grid_tar = bs.with_origin(far, tar)  # the all-weights-1 ROC on the grid, where the band is built
    point = np.array([bs.tar_at_far(grid_far, grid_tar, f)[0] for f in fars])
    assert np.mean((low <= point) & (point <= high)) >= 0.9


def test_seeded_and_reproducible_and_pairs_are_resampled_within_fold_and_class():
    rng = np.random.default_rng(0)
    scores, genuine = rng.normal(size=600), np.repeat([True, False], 300)
    scores[genuine] += 1.5
    folds = np.tile(np.repeat(np.arange(10), 30), 2)
    grid = np.array([1.0, 0.5, 0.0, -np.inf])
    counts = bs.pair_unit_counts(scores, genuine, folds, grid)
    weights = bs.replicate_weights(counts.strata, 50, np.random.default_rng(1))
    for stratum in np.unique(counts.strata):  # every replicate keeps each fold's 30 genuine and 30 impostor pairs
        assert (weights[:, counts.strata == stratum].sum(axis=1) == 30).all()
    metrics = {"auc": 0.8, "eer": 0.2, "n_impostor": 300}
    one = bs.bootstrap_intervals(counts, metrics, [], 0.5, 100, 0.9, seed=7).as_dict()
    assert one == bs.bootstrap_intervals(counts, metrics, [], 0.5, 100, 0.9, seed=7).as_dict()
    assert one != bs.bootstrap_intervals(counts, metrics, [], 0.5, 100, 0.9, seed=8).as_dict()
    assert one["unit"] == "pair" and one["level"] == 0.9


def test_bootstrap_options_are_checked_in_one_line():
    bs.check_bootstrap_options(0, 0.95)  # off
    bs.check_bootstrap_options(1000, 0.95)
    with pytest.raises(UserError, match=r"--bootstrap: 10 replicates are too few .* >= 40"):
        bs.check_bootstrap_options(10, 0.95)
    with pytest.raises(UserError, match=r"--ci-level: must be in \[0.5, 0.999\]"):
        bs.check_bootstrap_options(1000, 95)


def test_expanded_percentile_tails_widen_for_few_units():
    # (1 - level) / 2 for many units; t with n - 1 degrees of freedom and the sqrt(n / (n - 1)) factor for few
    assert bs.tail_probability(0.95, 10**6) == pytest.approx(0.025, abs=1e-5)
    assert bs.tail_probability(0.95, 80) == pytest.approx(0.0226, abs=2e-4)
    # at 7 units: 2 * P(Z > sqrt(7/6) * t_6(0.975) = 2.643) = 0.0082, t_6(0.975) = 2.447 from tables
    assert bs.tail_probability(0.95, 7) == pytest.approx(0.0041, abs=2e-4)
    tails = [bs.tail_probability(0.9, n) for n in (3, 10, 30, 100, 1000)]
    assert tails == sorted(tails) and tails[-1] < 0.05


@pytest.mark.parametrize("max_units", [bs.MAX_UNITS, 7])
def test_identity_counts_keep_the_pairs_of_failed_images_as_rejected(max_units, monkeypatch):
    """--fta nonmatch: the pairs of images that failed to acquire stay in the bootstrap's denominators, owned by
    their identities, so with every weight 1 the counts give the point figures the ROC with rejected pairs gives.
    Without them the interval would describe a different (exclude) evaluation than the figure it brackets."""
    from facetrain.evaluation.metrics import with_rejected_pairs
    from facetrain.evaluation.protocols import AllPairs, Plan

    monkeypatch.setattr(bs, "MAX_UNITS", max_units)
    emb, labels = _embeddings(200, 30)
    lab = labels.numpy()
    plan = Plan([f"{i}.png" for i in range(len(lab))], *count_pairs(lab), len(np.unique(lab)), "test", labels=lab)
    failed = {0, 1, 2, 50, 51, 199}  # several from one identity, the pair between two failed images too
    kept_plan, kept = AllPairs().without(plan, emb, failed)
    roc = with_rejected_pairs(all_pairs_roc(kept, torch.as_tensor(kept_plan.labels), mode="exact"),
                              kept_plan.left_out_genuine, kept_plan.left_out_impostor)
    n_genuine, n_impostor = count_pairs(lab)  # every pair of the folder, failed or not
    assert (roc.n_genuine, roc.n_impostor) == (n_genuine, n_impostor)
    metrics = verification_metrics(roc, target_fars=(1e-1, 1e-2), target_far=1e-2)
    grid = bs.threshold_grid(roc, [metrics["threshold@far=1e-02"]])
    counts = AllPairs().unit_counts(kept, kept_plan, grid, seed=3, policy="nonmatch")
    far, tar = bs.weighted_rates(counts, np.ones((1, counts.genuine.shape[0])))
    at = np.searchsorted(-roc.thresholds, -grid[:-1])
    np.testing.assert_allclose(far[0, :-1], roc.far[at], rtol=0, atol=1e-12)
    np.testing.assert_allclose(tar[0, :-1], roc.tar[at], rtol=0, atol=1e-12)
    assert counts.genuine[:, -1].sum() == n_genuine
    between = 0 if counts.between is None else counts.between[:, :, -1].sum() / 2
    assert counts.within[:, -1].sum() + between == n_impostor
    # and under exclude they are simply absent
    excluded = AllPairs().unit_counts(kept, kept_plan, grid, seed=3, policy="exclude")
    assert excluded.genuine[:, -1].sum() == kept_plan.n_genuine
