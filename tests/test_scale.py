"""The P x m sampler at thousands of identities (labels only, no images): cost per image stays flat, and an
epoch still visits every identity, equally often. bench/scale_rehearsal.py and docs/scale.md have the timings.

No wall-clock limits: costs are compared as ratios between identity counts, measured as process CPU time,
best of a few repeats, so a loaded machine slows both sides alike.
"""

from __future__ import annotations

import time

import numpy as np

from facetrain.data.sampler import MPerClassBatchSampler

IMAGES_PER_ID = 50
# the rehearsal's layout: 2 ranks x P 8 x m 4 = global batch 64 (plan() is global, the same on every rank)
M, BATCH, WORLD = 4, 32, 2


def labels_for(identities: int, per_id: int = IMAGES_PER_ID) -> np.ndarray:
    return np.repeat(np.arange(identities), per_id)


def best_cpu_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def epoch_plan(labels: np.ndarray, epoch: int = 0) -> np.ndarray:
    sampler = MPerClassBatchSampler(labels, M, BATCH, num_replicas=WORLD, rank=0, seed=0)
    sampler.set_epoch(epoch)
    return sampler.plan()[0]


def test_epoch_cost_per_drawn_image_does_not_grow_with_identities():
    """Building the sampler and one epoch's plan for 2000 identities costs about what 100 identities cost
    per drawn image (per-identity work must stay O(images), never O(identities x images))."""
    cost = {}
    for n, repeats in ((100, 5), (2000, 3)):
        labels = labels_for(n)
        drawn = epoch_plan(labels).size
        cost[n] = best_cpu_seconds(lambda labels=labels: epoch_plan(labels), repeats) / drawn
    assert cost[2000] / cost[100] < 5, f"per-image cost {cost[2000] * 1e6:.2f} us at 2000 identities vs " \
                                       f"{cost[100] * 1e6:.2f} us at 100"
    # construction alone, per label, at 20,000 identities: a scan of all labels per identity is quadratic
    # (~200x the 100-identity cost per label here); one sort is not
    small, large = labels_for(100, 10), labels_for(20_000, 10)
    per_label = {len(x): best_cpu_seconds(lambda x=x: MPerClassBatchSampler(x, M, BATCH, WORLD, 0), 3) / len(x)
                 for x in (small, large)}
    assert per_label[len(large)] / per_label[len(small)] < 5


def test_epoch_at_2000_identities_visits_every_identity_equally_often():
    labels = labels_for(2000)
    plan = epoch_plan(labels, epoch=3)
    group_ids = labels[plan[:, :, 0]]  # (steps, P_global): the identity of each P x m group
    assert (labels[plan] == group_ids[:, :, None]).all()  # each group holds m images of its identity
    visits = np.bincount(group_ids.reshape(-1), minlength=2000)
    assert visits.min() >= 1  # every identity appears in the epoch
    assert visits.max() - visits.min() <= 1  # balanced: consecutive permutations of the identities
    for step in plan:  # no identity twice in a global batch, no image twice in a group
        assert len(set(labels[step[:, 0]].tolist())) == len(step)
        assert all(len(set(group.tolist())) == M for group in step)
