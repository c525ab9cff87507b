"""MIL attention diagnostics: limiting cases checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from losslab.engine.diagnostics import attention_statistics, selection_confidence


def test_uniform_attention():
    n = 8
    stats = attention_statistics(np.full((3, n), 1.0 / n))
    assert stats["attention_entropy"] == pytest.approx(math.log(n))
    assert stats["attention_entropy_normalised"] == pytest.approx(1.0)
    assert stats["attention_top1"] == pytest.approx(1.0 / n)
    assert stats["effective_instances"] == pytest.approx(n)
    assert set(stats) == {
        "attention_entropy", "attention_entropy_normalised", "attention_top1",
        "effective_instances",
    }


def test_one_hot_attention():
    attention = np.zeros((2, 5))
    attention[0, 3] = attention[1, 0] = 1.0
    stats = attention_statistics(torch.tensor(attention))
    assert stats["attention_entropy"] == pytest.approx(0.0)
    assert stats["attention_entropy_normalised"] == pytest.approx(0.0)
    assert stats["attention_top1"] == pytest.approx(1.0)
    assert stats["effective_instances"] == pytest.approx(1.0)


def test_mask_and_mean_over_bags():
    # bag 0: uniform over 4 valid of 6 (padding carries weight that must be ignored);
    # bag 1: (0.5, 0.5) over 2 valid; bag 2: a single valid instance
    attention = np.array(
        [
            [0.2, 0.2, 0.2, 0.2, 0.1, 0.1],
            [0.5, 0.5, 0.0, 0.0, 0.0, 0.0],
            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    mask = np.array(
        [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=bool
    )
    stats = attention_statistics(attention, mask)
    assert stats["attention_entropy"] == pytest.approx((math.log(4) + math.log(2) + 0) / 3)
    # n_valid = 1 is defined as 0, not NaN
    assert stats["attention_entropy_normalised"] == pytest.approx((1 + 1 + 0) / 3)
    assert stats["attention_top1"] == pytest.approx((0.25 + 0.5 + 1.0) / 3)
    assert stats["effective_instances"] == pytest.approx((4 + 2 + 1) / 3)


def test_known_non_uniform_bag():
    a = np.array([0.5, 0.25, 0.25])
    stats = attention_statistics(a)
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert stats["attention_entropy"] == pytest.approx(entropy)
    assert stats["attention_entropy_normalised"] == pytest.approx(entropy / math.log(3))
    assert stats["effective_instances"] == pytest.approx(1 / (0.25 + 2 * 0.0625))


def test_empty_bags_skipped_and_bad_input():
    attention = np.array([[0.5, 0.5], [0.3, 0.7]])
    stats = attention_statistics(attention, np.array([[1, 1], [0, 0]], dtype=bool))
    assert stats["attention_top1"] == pytest.approx(0.5)
    all_empty = attention_statistics(attention, np.zeros((2, 2), dtype=bool))
    assert all(math.isnan(v) for v in all_empty.values())
    with pytest.raises(ValueError, match="non-negative"):
        attention_statistics(np.array([[1.5, -0.5]]))
    with pytest.raises(ValueError, match="mask"):
        attention_statistics(attention, np.ones((2, 3), dtype=bool))


def test_selection_confidence_binary_and_multiclass():
    probs = np.array([[0.1, 0.9, 0.95], [0.2, 0.4, 0.3]])
    mask = np.array([[1, 1, 0], [1, 1, 1]], dtype=bool)
    # padding (0.95) is ignored: critical instances score 0.9 and 0.4
    assert selection_confidence(probs, mask) == pytest.approx((0.9 + 0.4) / 2)
    assert selection_confidence(probs) == pytest.approx((0.95 + 0.4) / 2)
    multiclass = np.array(
        [
            [[0.6, 0.3, 0.1], [0.2, 0.1, 0.7]],  # best class score 0.7 (instance 1, class 2)
            [[0.4, 0.35, 0.25], [0.5, 0.25, 0.25]],  # 0.5
        ]
    )
    assert selection_confidence(torch.tensor(multiclass)) == pytest.approx((0.7 + 0.5) / 2)
    assert math.isnan(selection_confidence(probs, np.zeros((2, 3), dtype=bool)))
