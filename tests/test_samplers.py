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


@pytest.mark.parametrize("name", ["none", "weighted_random", "sqrt_weighted_random", "class_balanced_batch"])
def test_sampled_class_distribution_is_what_the_sampler_draws(name):
    from losslab.data.samplers import sampled_class_distribution

    labels = np.array([0] * 60 + [1] * 15 + [2] * 5)
    torch.manual_seed(3)
    sampler, batch_sampler = build_sampler(name, labels, batch_size=6)
    if batch_sampler is not None:
        draws = np.concatenate([labels[b] for _ in range(100) for b in batch_sampler])
    elif sampler is not None:
        draws = np.concatenate([labels[list(sampler)] for _ in range(200)])
    else:
        draws = labels
    observed = np.bincount(draws, minlength=3) / len(draws)
    expected = sampled_class_distribution(name, np.bincount(labels))
    # hand-worked: uniform, counts/80, sqrt(counts)/sum
    by_hand = {"none": [60 / 80, 15 / 80, 5 / 80], "weighted_random": [1 / 3] * 3,
               "class_balanced_batch": [1 / 3] * 3,
               "sqrt_weighted_random": np.sqrt([60, 15, 5]) / np.sqrt([60, 15, 5]).sum()}[name]
    np.testing.assert_allclose(expected, by_hand, rtol=1e-12)
    np.testing.assert_allclose(observed, expected, atol=0.03)


def test_classifier_bias_starts_at_the_prior_of_the_batches(make_config):
    """A balancing sampler draws classes uniformly: the classifier must not start at the data's
    2.8 : 1 prior (it predicted only the majority class for the demo's first two epochs)."""
    from losslab.pipelines.train import build_components

    counts = [20, 56]
    for sampler, prior in (("none", np.array(counts) / 76), ("weighted_random", np.array([0.5, 0.5]))):
        _, model = build_components(make_config(f"data.sampler={sampler}"), counts)
        bias = model.head.classifier.bias.detach().double()
        np.testing.assert_allclose(torch.softmax(bias, 0).numpy(), prior, atol=1e-6)
