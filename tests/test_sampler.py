"""The distributed P x m sampler, with a simulated world size (no processes needed)."""

from __future__ import annotations

import numpy as np
import pytest

from facetrain.data.sampler import MPerClassBatchSampler
from facetrain.errors import UserError

# 30 identities with 5..14 images each, plus two with fewer than m=4 images
LABELS = np.concatenate([np.full(5 + k % 10, k) for k in range(30)] + [np.full(3, 30), np.full(1, 31)])


def rank_samplers(world: int, batch_size: int = 8, m: int = 4, seed: int = 0, labels=LABELS):
    return [MPerClassBatchSampler(labels, m, batch_size, world, r, seed) for r in range(world)]


def positions(batch):
    return [p for p, _ in batch]


def epoch_batches(samplers, epoch: int, start: int = 0):
    for s in samplers:
        s.set_epoch(epoch, start)
    return [[positions(b) for b in s] for s in samplers]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_global_batch_is_p_by_m_and_ranks_are_disjoint(world):
    samplers = rank_samplers(world)
    per_rank = epoch_batches(samplers, 0)
    assert len({len(b) for b in per_rank}) == 1  # every rank takes the same number of steps
    for step in range(len(per_rank[0])):
        global_batch = [p for r in range(world) for p in per_rank[r][step]]
        labels = LABELS[global_batch]
        ids, counts = np.unique(labels, return_counts=True)
        assert len(ids) == (8 // 4) * world and set(counts) == {4}  # P identities x m images
        assert len(set(global_batch)) == len(global_batch)  # no image twice in a batch
        for r in range(world):  # each rank holds whole identity groups, disjoint from other ranks
            own = set(LABELS[per_rank[r][step]])
            others = {x for q in range(world) if q != r for x in LABELS[per_rank[q][step]]}
            assert not own & others
            assert all((LABELS[per_rank[r][step]] == i).sum() == 4 for i in own)


def test_epoch_visits_every_identity_and_cycles_images():
    (s,) = rank_samplers(1)
    batches = epoch_batches([s], 3)[0]
    seen = np.concatenate(batches)
    kept = np.flatnonzero(np.isin(LABELS, s.identities))
    assert set(LABELS[seen]) == set(range(30))  # every identity with >= m images
    assert s.excluded == 2  # the identities with 3 and 1 images are counted and left out
    assert len(batches) == s.steps_per_epoch == int(np.ceil(len(kept) / 8))  # epoch tied to the data size
    assert len(seen) >= len(kept)  # as many draws as the training set has images
    for ident in range(30):  # each identity's images cycle: no repeat before all of them were shown
        drawn = [p for p in seen if LABELS[p] == ident]
        first = drawn[: (LABELS == ident).sum()]
        assert len(set(first)) == len(first)


def test_epoch_length_not_a_fixed_sample_count():
    small = rank_samplers(1)[0]
    big = MPerClassBatchSampler(np.repeat(np.arange(300), 10), 4, 8)
    assert big.steps_per_epoch == 3000 // 8 and small.steps_per_epoch < 100


def test_same_seed_same_order_different_epoch_or_seed_different_order():
    a, b = rank_samplers(2), rank_samplers(2)
    assert epoch_batches(a, 5) == epoch_batches(b, 5)
    assert epoch_batches(a, 5) != epoch_batches(a, 6)
    assert epoch_batches(rank_samplers(2, seed=1), 5) != epoch_batches(a, 5)


def test_order_ignores_global_random_state():
    (s,) = rank_samplers(1)
    np.random.seed(1)
    first = epoch_batches([s], 2)
    np.random.seed(2)
    np.random.rand(100)
    import torch

    torch.manual_seed(7)
    assert epoch_batches([s], 2) == first


def test_mid_epoch_resume_continues_the_same_order():
    samplers = rank_samplers(2)
    full = epoch_batches(samplers, 4)
    again = rank_samplers(2)
    resumed = epoch_batches(again, 4, start=3)
    assert [b[3:] for b in full] == resumed
    assert len(again[0]) == again[0].steps_per_epoch - 3


def test_one_process_equals_two_processes_global_batches():
    """A 1-process run with batch 16 sees exactly the global batches of 2 processes with batch 8."""
    (one,) = rank_samplers(1, batch_size=16)
    two = rank_samplers(2, batch_size=8)
    single = epoch_batches([one], 1)[0]
    per_rank = epoch_batches(two, 1)
    assert single == [per_rank[0][k] + per_rank[1][k] for k in range(len(single))]


def test_augmentation_seeds_are_part_of_the_plan():
    (s,) = rank_samplers(1)
    s.set_epoch(0)
    batch = next(iter(s))
    assert all(isinstance(seed, int) for _, seed in batch) and len({seed for _, seed in batch}) == len(batch)


def test_too_few_identities_is_a_clear_error():
    with pytest.raises(UserError, match="a global batch needs 32 distinct identities"):
        MPerClassBatchSampler(LABELS, 4, 64, num_replicas=2)


def test_multiple_of_grad_accumulation():
    """An epoch is rounded up to whole optimizer steps (grad_accum_steps micro-steps each). LABELS give 36
    micro-steps at batch 8 (285 images / 8), which is already a multiple of 2, 3, 4 and 6 -- so only a
    multiple_of that does not divide 36 shows whether it is applied: 5 -> 40, 7 -> 42."""
    plain = MPerClassBatchSampler(LABELS, 4, 8)
    assert plain.steps_per_epoch == 36
    for multiple_of, expected in ((5, 40), (7, 42), (4, 36)):
        s = MPerClassBatchSampler(LABELS, 4, 8, multiple_of=multiple_of)
        assert s.steps_per_epoch == expected
        batches = epoch_batches([s], 0)[0]
        assert len(batches) == expected  # the iterator really yields the padded epoch
        for batch in batches:  # the extra micro-steps are ordinary P x m batches
            ids, counts = np.unique(LABELS[batch], return_counts=True)
            assert len(ids) == 2 and set(counts) == {4}
        s.set_epoch(0, start=expected - 3)  # mid-epoch resume counts down to the padded end
        assert len(s) == 3
