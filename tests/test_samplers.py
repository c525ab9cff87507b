import numpy as np
import pytest
import torch

from losslab.data.samplers import ClassBalancedBatchSampler, build_sampler, sample_weights


def test_weighted_random_draws_classes_about_equally():
    labels = np.array([0] * 88 + [1] * 7 + [2] * 5)
    torch.manual_seed(0)
    sampler, batch_sampler = build_sampler("weighted_random", labels, batch_size=8)
    assert batch_sampler is None
    draws = np.concatenate([labels[list(sampler)] for _ in range(50)])
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [1 / 3] * 3, atol=0.03)


def test_sqrt_weights_are_inverse_sqrt_frequency():
    labels = np.array([0] * 16 + [1] * 4)
    w = sample_weights(labels, power=0.5)
    assert w[0] == pytest.approx(1 / 4) and w[-1] == pytest.approx(1 / 2)
    # class shares under sqrt weighting: 16/4 : 4/2 = 4 : 2
    share = np.array([w[labels == c].sum() for c in (0, 1)])
    np.testing.assert_allclose(share / share.sum(), [2 / 3, 1 / 3])


def test_class_balanced_batches_hold_every_class_equally():
    labels = np.array([0] * 30 + [1] * 6 + [2] * 3)
    torch.manual_seed(1)
    sampler = ClassBalancedBatchSampler(labels, batch_size=6)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 7
    for batch in batches:
        assert np.bincount(labels[batch], minlength=3).tolist() == [2, 2, 2]
    # within a class, samples are drawn without replacement until the class is exhausted
    first_rare = [i for b in batches[:1] for i in b if labels[i] == 2]
    assert len(set(first_rare)) == len(first_rare)


def test_unknown_sampler_and_too_small_batch_are_clear_errors():
    with pytest.raises(ValueError, match="data.sampler 'oversample'"):
        build_sampler("oversample", np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="batch_size >= number of classes"):
        ClassBalancedBatchSampler(np.array([0, 1, 2]), batch_size=2)
