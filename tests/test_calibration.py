"""Calibration: thresholds / offsets / temperature fitted on validation, checked on test."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.special import softmax
from sklearn import metrics as skm

from losslab.engine.calibration import (
    Calibrator,
    _scores,
    as_logits,
    fit_logit_offsets,
    fit_temperature,
    fit_threshold,
)
from losslab.engine.metrics import classification_metrics


def sample_labels(logits, rng):
    """Labels drawn from softmax(logits) with the Gumbel-max trick."""
    return np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)


def collapsed_binary(n, rng):
    """Well-ranked logits whose argmax is always class 0 (the 'AUC 0.97, one class' case)."""
    y = (rng.random(n) < 0.2).astype(int)
    score = 2.0 * y + rng.normal(0, 0.45, size=n)  # AUC ~ 0.99
    logits = np.stack([np.full(n, 4.0), score], axis=1)  # class 0 always wins
    return y, logits


# --------------------------------------------------------------------------- threshold
@pytest.mark.parametrize("method", ["youden", "f1"])
def test_fit_threshold_is_the_best_operating_point(method):
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(int)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.15, size=300), 0, 1)
    threshold = fit_threshold(y, p, method=method)
    assert threshold in set(p)  # one of the validation scores

    def value(t):
        pred = (p >= t).astype(int)
        if method == "youden":
            return skm.recall_score(y, pred) - (pred[y == 0] == 1).mean()
        return skm.f1_score(y, pred, zero_division=0)

    best_by_brute_force = max(value(t) for t in np.unique(p))
    assert value(threshold) == pytest.approx(best_by_brute_force)


def test_fit_threshold_hand_example():
    # negatives .1 .2 .3 .4 .5 .7, positives .6 .8: predicting p >= .6 catches both positives
    # with one false positive (Youden 1 - 1/6, F1 0.8): the best for both methods
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.6, 0.8])
    assert fit_threshold(y, p, "youden") == pytest.approx(0.6)
    assert fit_threshold(y, p, "f1") == pytest.approx(0.6)


def test_fit_threshold_degenerate_and_bad_method():
    with pytest.warns(UserWarning, match="single class"):
        assert fit_threshold(np.zeros(4, int), np.linspace(0, 1, 4)) == 0.5
    with pytest.raises(ValueError, match="method"):
        fit_threshold([0, 1], [0.2, 0.8], method="accuracy")


def test_threshold_calibration_fixes_collapsed_binary_on_held_out_half():
    rng = np.random.default_rng(1)
    y, logits = collapsed_binary(2000, rng)
    val, test = slice(0, 1000), slice(1000, 2000)
    probs_test = softmax(logits[test], axis=1)
    before = classification_metrics(y[test], probs_test, ["neg", "pos"])
    assert before["auc"] > 0.97
    assert before["balanced_accuracy"] == 0.5 and before["dead_class_count"] == 1.0

    calibrator = Calibrator().fit(y[val], logits[val], num_classes=2)
    assert calibrator.method == "threshold"
    after = classification_metrics(
        y[test], calibrator.transform_probs(logits[test]), ["neg", "pos"],
        y_pred=calibrator.predict(logits[test]),
    )
    assert after["balanced_accuracy"] > 0.9
    assert after["dead_class_count"] == 0.0
    assert after["auc"] == pytest.approx(before["auc"])  # temperature keeps the ranking


# --------------------------------------------------------------------------- offsets
def test_vectorised_scores_match_sklearn():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, size=50)
    y[y == 2] = 1  # class 2 absent from y_true: balanced accuracy skips it, F1 counts it
    predictions = rng.integers(0, 3, size=(7, 50))
    bal = _scores(y, predictions, 3, "balanced_accuracy")
    f1 = _scores(y, predictions, 3, "f1_macro")
    for g in range(7):
        with np.errstate(all="ignore"), pytest.warns(UserWarning) if (
            predictions[g] == 2
        ).any() else _nothing():
            expected_bal = skm.balanced_accuracy_score(y, predictions[g])
        assert bal[g] == pytest.approx(expected_bal)
        assert f1[g] == pytest.approx(
            skm.f1_score(y, predictions[g], labels=[0, 1, 2], average="macro", zero_division=0)
        )


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_logit_offsets_fix_prior_collapsed_three_class_model():
    rng = np.random.default_rng(3)
    n = 3000
    y = rng.choice(3, size=n, p=[0.7, 0.2, 0.1])
    logits = 2.5 * np.eye(3)[y] + rng.normal(0, 0.6, size=(n, 3))
    logits[:, 1:] -= 4.0  # a strong prior toward class 0: classes 1 and 2 nearly never win
    val, test = slice(0, n // 2), slice(n // 2, n)
    names = ["normal", "moderate", "severe"]
    before = classification_metrics(y[test], softmax(logits[test], 1), names)
    assert before["balanced_accuracy"] < 0.4

    offsets = fit_logit_offsets(y[val], logits[val])
    assert offsets.shape == (3,) and offsets[0] == 0.0
    assert offsets[1] > 3.0 and offsets[2] > 3.0  # the prior shift is undone
    pred = np.argmax(logits[test] + offsets, axis=1)
    after = classification_metrics(y[test], softmax(logits[test], 1), names, y_pred=pred)
    assert after["balanced_accuracy"] > 0.85
    assert after["dead_class_count"] == 0.0

    calibrator = Calibrator().fit(y[val], torch.tensor(logits[val]), num_classes=3)
    assert calibrator.method == "offsets"
    assert skm.balanced_accuracy_score(y[test], calibrator.predict(logits[test])) > 0.85


def test_logit_offsets_keep_zero_when_already_optimal():
    y = np.array([0, 1, 2, 0, 1, 2])
    logits = 5.0 * np.eye(3)[y]
    np.testing.assert_allclose(fit_logit_offsets(y, logits, grid=np.linspace(-1, 1, 21)), 0.0)


def test_logit_offsets_bad_objective():
    with pytest.raises(ValueError, match="objective"):
        fit_logit_offsets([0, 1], np.eye(2), objective="auc")


# --------------------------------------------------------------------------- temperature
def test_fit_temperature_recovers_known_temperature():
    rng = np.random.default_rng(4)
    generating = rng.normal(0, 1.5, size=(20000, 4))
    y = sample_labels(generating, rng)
    overconfident = 3.0 * generating  # the model's logits are 3x too sharp
    temperature = fit_temperature(overconfident, y)
    assert temperature == pytest.approx(3.0, rel=0.05)
    # and under-confident logits give T < 1
    assert fit_temperature(generating / 2.0, y) == pytest.approx(0.5, rel=0.05)


def test_binary_single_logit_is_sigmoid():
    z = np.array([-2.0, 0.0, 3.0])
    probs = Calibrator().transform_probs(z)
    np.testing.assert_allclose(probs[:, 1], 1 / (1 + np.exp(-z)))
    assert as_logits(z[:, None]).shape == (3, 2)


# --------------------------------------------------------------------------- serialisation
@pytest.mark.parametrize("num_classes", [2, 3])
def test_the_logged_calibration_json_reproduces_the_calibrated_predictions(num_classes):
    """``evaluate`` logs ``to_dict()`` as ``calibration.json``: it survives JSON unchanged and its
    numbers alone give the calibrator's probabilities and predictions (computed here by hand)."""
    rng = np.random.default_rng(5)
    y = rng.integers(0, num_classes, size=400)
    logits = 2.0 * np.eye(num_classes)[y] + rng.normal(size=(400, num_classes))
    calibrator = Calibrator().fit(y, logits, num_classes=num_classes)
    logged = calibrator.to_dict()
    read_back = json.loads(json.dumps(logged))
    assert read_back == logged and read_back["num_classes"] == num_classes
    probs = softmax(logits / read_back["temperature"], axis=1)
    if num_classes == 2:
        assert read_back["method"] == "threshold" and read_back["offsets"] is None
        expected = (probs[:, 1] >= read_back["threshold"]).astype(int)
    else:
        assert read_back["method"] == "offsets" and read_back["threshold"] is None
        expected = np.argmax(logits / read_back["temperature"] + np.array(read_back["offsets"]), axis=1)
    np.testing.assert_allclose(calibrator.transform_probs(logits), probs)
    np.testing.assert_array_equal(calibrator.predict(logits), expected)
    assert read_back["temperature"] != 1.0  # fitted, so the check above is not plain softmax


def test_unfitted_calibrator_is_plain_argmax():
    logits = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0]])
    np.testing.assert_array_equal(Calibrator().predict(logits), [1, 0])
