"""Distributed samplers (torchrun): the shards of all ranks together are the single-process draw of
the same (seed, epoch), ranks get equal lengths, and the class sampling strategy is kept."""

from __future__ import annotations

import numpy as np
import pytest
from torch.utils.data import DistributedSampler

from losslab.data.samplers import (DistributedClassBalancedBatchSampler, DistributedWeightedRandomSampler,
                                   build_distributed_sampler, sample_weights)

LABELS = np.array([0] * 90 + [1] * 9 + [2] * 3)  # 102 cases, imbalance 30:3:1


def _interleave(shards):
    out = []
    for i in range(max(len(s) for s in shards)):
        out += [s[i] for s in shards if i < len(s)]
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_weighted_shards_interleave_to_the_single_process_draw(world):
    single = DistributedWeightedRandomSampler(sample_weights(LABELS), num_replicas=1, rank=0, seed=7,
                                              num_samples=len(LABELS) + (-len(LABELS)) % world)
    single.set_epoch(3)
    shards = []
    for r in range(world):
        s = DistributedWeightedRandomSampler(sample_weights(LABELS), num_replicas=world, rank=r, seed=7)
        s.set_epoch(3)
        shards.append(list(s))
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == -(-len(LABELS) // world)
    assert _interleave(shards) == list(single)
    # another epoch is another draw; the same epoch is the same draw
    s0 = DistributedWeightedRandomSampler(sample_weights(LABELS), num_replicas=world, rank=0, seed=7)
    s0.set_epoch(3)
    assert list(s0) == shards[0]
    s0.set_epoch(4)
    assert list(s0) != shards[0]


@pytest.mark.parametrize("power, expected", [(1.0, [1 / 3, 1 / 3, 1 / 3]), (0.5, None)])
def test_weighted_shards_keep_the_class_balance(power, expected):
    weights = sample_weights(LABELS, power)
    if expected is None:  # sqrt: class mass ∝ n_c / sqrt(n_c) = sqrt(n_c)
        roots = np.sqrt(np.bincount(LABELS))
        expected = roots / roots.sum()
    drawn = []
    for epoch in range(40):
        for r in range(2):
            s = DistributedWeightedRandomSampler(weights, num_replicas=2, rank=r, seed=0)
            s.set_epoch(epoch)
            drawn += list(s)
    freq = np.bincount(LABELS[drawn], minlength=3) / len(drawn)
    np.testing.assert_allclose(freq, expected, atol=0.03)  # 4080 draws: ~3.5 standard errors
    # each rank alone is balanced too (a strided shard of an i.i.d. draw)
    s = DistributedWeightedRandomSampler(weights, num_replicas=2, rank=1, seed=0)
    one = [i for e in range(40) for i in (s.set_epoch(e) or list(s))]
    np.testing.assert_allclose(np.bincount(LABELS[one], minlength=3) / len(one), expected, atol=0.04)


@pytest.mark.parametrize("world", [2, 3])
def test_class_balanced_batches_are_shared_out_and_stay_balanced(world):
    batch_size = 6
    shards = []
    for r in range(world):
        s = DistributedClassBalancedBatchSampler(LABELS, batch_size, num_replicas=world, rank=r, seed=5)
        s.set_epoch(2)
        shards.append(list(s))
    reference = DistributedClassBalancedBatchSampler(LABELS, batch_size, num_replicas=world, rank=0, seed=5)
    reference.set_epoch(2)
    assert _interleave(shards) == reference.global_batches()  # the union is the identically-seeded draw
    assert len({len(s) for s in shards}) == 1
    assert len(shards[0]) * batch_size * world >= len(LABELS)  # an epoch still covers the data size
    for shard in shards:
        for batch in shard:
            assert len(batch) == batch_size
            assert np.bincount(LABELS[batch], minlength=3).tolist() == [2, 2, 2]
    other = DistributedClassBalancedBatchSampler(LABELS, batch_size, num_replicas=world, rank=0, seed=5)
    other.set_epoch(3)
    assert list(other) != shards[0]


def test_build_distributed_sampler_kinds_and_none_covers_every_index():
    sampler, batch_sampler = build_distributed_sampler("none", LABELS, 4, num_replicas=2, rank=1, seed=0)
    assert isinstance(sampler, DistributedSampler) and batch_sampler is None
    shards = []
    for r in range(2):
        s, _ = build_distributed_sampler("none", LABELS, 4, num_replicas=2, rank=r, seed=0)
        s.set_epoch(1)
        shards.append(list(s))
    assert sorted(shards[0] + shards[1]) == list(range(len(LABELS)))
    s, b = build_distributed_sampler("sqrt_weighted_random", LABELS, 4, 2, 0)
    assert isinstance(s, DistributedWeightedRandomSampler) and b is None
    s, b = build_distributed_sampler("class_balanced_batch", LABELS, 4, 2, 0)
    assert s is None and isinstance(b, DistributedClassBalancedBatchSampler)
    with pytest.raises(ValueError, match="data.sampler"):
        build_distributed_sampler("oversample", LABELS, 4, 2, 0)
    with pytest.raises(ValueError, match="rank"):
        DistributedWeightedRandomSampler(sample_weights(LABELS), num_replicas=2, rank=2)
