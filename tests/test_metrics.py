"""Metrics: values checked by hand or against scikit-learn."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from losslab.engine.metrics import (
    unexplained_variance,
    Alarm,
    Alarms,
    DeadClassMonitor,
    classification_metrics,
    confusion_matrix,
    dead_class_names,
    dead_classes,
    expected_calibration_error,
    pred_counts,
    rsna_weighted_log_loss,
)

NAMES3 = ["normal", "moderate", "severe"]


def one_hot_probs(y_pred, k, confidence=0.8):
    """Probabilities whose argmax is y_pred, with the rest spread evenly."""
    p = np.full((len(y_pred), k), (1 - confidence) / (k - 1))
    p[np.arange(len(y_pred)), y_pred] = confidence
    return p


# --------------------------------------------------------------------------- hand-built case
def test_hand_built_confusion_case():
    # true 0: 4 samples -> predicted 0,0,0,1 ; true 1: 3 -> 1,1,0 ; true 2: 3 -> 2,0,0
    y = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 0, 2, 0, 0])
    m = classification_metrics(y, one_hot_probs(pred, 3), NAMES3)
    assert m["recall_normal"] == pytest.approx(3 / 4)
    assert m["recall_moderate"] == pytest.approx(2 / 3)
    assert m["recall_severe"] == pytest.approx(1 / 3)
    # predicted 0: 6 (3 right), predicted 1: 3 (2 right), predicted 2: 1 (1 right)
    assert m["precision_normal"] == pytest.approx(3 / 6)
    assert m["precision_moderate"] == pytest.approx(2 / 3)
    assert m["precision_severe"] == pytest.approx(1.0)
    assert [m[f"pred_count_{c}"] for c in NAMES3] == [6.0, 3.0, 1.0]
    assert m["accuracy"] == pytest.approx(6 / 10)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 1 / 3) / 3)
    assert m["min_class_recall"] == pytest.approx(1 / 3)
    assert m["dead_class_count"] == 0.0
    f1 = [2 * p * r / (p + r) for p, r in [(0.5, 0.75), (2 / 3, 2 / 3), (1.0, 1 / 3)]]
    assert m["f1_macro"] == pytest.approx(np.mean(f1))
    # every sample has confidence 0.8, accuracy 0.6 -> ECE = 0.2
    assert m["ece"] == pytest.approx(0.2)
    assert m["log_loss"] == pytest.approx(-(6 * math.log(0.8) + 4 * math.log(0.1)) / 10)
    assert all(type(v) is float for v in m.values())
    cm = confusion_matrix(y, pred, 3)
    np.testing.assert_array_equal(cm, [[3, 1, 0], [1, 2, 0], [2, 0, 1]])


def test_matches_sklearn_on_random_multiclass():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=300)
    logits = rng.normal(size=(300, 4)) + 1.5 * np.eye(4)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(torch.tensor(y), torch.tensor(probs), list("abcd"))
    pred = probs.argmax(1)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, probs))
    assert m["recall_c"] == pytest.approx(skm.recall_score(y == 2, pred == 2))


def test_y_pred_overrides_argmax():
    y = np.array([0, 1, 1, 0])
    probs = one_hot_probs(np.array([0, 0, 0, 0]), 2)
    m = classification_metrics(y, probs, ["neg", "pos"], y_pred=np.array([0, 1, 1, 1]))
    assert m["recall_pos"] == 1.0 and m["recall_neg"] == 0.5
    assert m["pred_count_pos"] == 3.0


def test_auc_high_but_every_prediction_class_zero():
    # well-ranked scores, but p(class 1) < 0.5 everywhere: argmax is always 0
    rng = np.random.default_rng(1)
    y = (rng.random(400) < 0.2).astype(int)
    p1 = np.clip(0.1 + 0.25 * y + rng.normal(0, 0.05, size=400), 0.0, 0.45)
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(y, probs, ["benign", "malignant"])
    assert m["auc"] > 0.97
    assert m["balanced_accuracy"] == 0.5
    assert m["dead_class_count"] == 1.0
    assert m["pred_count_malignant"] == 0.0
    assert m["recall_malignant"] == 0.0 and m["precision_malignant"] == 0.0
    assert m["min_class_recall"] == 0.0


def test_single_class_in_y_true_gives_nan_auc_without_raising():
    y = np.zeros(5, dtype=int)
    probs = one_hot_probs(np.array([0, 0, 1, 0, 2]), 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sklearn warnings leak either
        m = classification_metrics(y, probs, NAMES3)
    assert math.isnan(m["auc"])
    assert m["min_class_recall"] == pytest.approx(3 / 5)  # only class 0 is present
    assert m["balanced_accuracy"] == pytest.approx(3 / 5)
    assert m["dead_class_count"] == 0.0


def test_auc_skips_absent_class_in_multiclass():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.5, 0.2]])
    m = classification_metrics(y, probs, NAMES3)
    # class 0 vs rest and class 1 vs rest both perfectly ranked; class 2 absent -> skipped
    assert m["auc"] == pytest.approx(1.0)


def test_class_names_length_checked():
    with pytest.raises(ValueError, match="class_names"):
        classification_metrics([0, 1], [[0.5, 0.5], [0.5, 0.5]], ["only_one"])


# --------------------------------------------------------------------------- ECE
def test_ece_zero_on_perfectly_calibrated_toy():
    # confidence 0.8 on 10 samples with 8 correct; confidence 0.6 on 5 samples with 3 correct
    y = np.array([0] * 8 + [1] * 2 + [1] * 3 + [0] * 2)
    probs = np.array([[0.8, 0.2]] * 10 + [[0.4, 0.6]] * 5)
    assert expected_calibration_error(y, probs) == pytest.approx(0.0, abs=1e-12)


def test_ece_known_miscalibration():
    # confidence 0.9 everywhere but half right -> 0.4 ; plus a bin at 0.55 all right -> 0.45
    y = np.array([0, 1, 0, 1, 1, 1])
    probs = np.array([[0.9, 0.1]] * 4 + [[0.45, 0.55]] * 2)
    expected = (4 * abs(0.5 - 0.9) + 2 * abs(1.0 - 0.55)) / 6
    assert expected_calibration_error(y, probs, n_bins=15) == pytest.approx(expected)
    # with one bin, ECE = |mean accuracy - mean confidence|
    acc, conf = 4 / 6, (4 * 0.9 + 2 * 0.55) / 6
    assert expected_calibration_error(y, probs, n_bins=1) == pytest.approx(abs(acc - conf))


# --------------------------------------------------------------------------- RSNA metric
def test_rsna_weighted_log_loss_against_sklearn_and_by_hand():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, size=200)
    raw = rng.random((200, 3)) + 0.05
    weights = np.array([1.0, 2.0, 4.0])
    got = rsna_weighted_log_loss(y, raw)  # rows do not sum to one: renormalised
    normalised = raw / raw.sum(1, keepdims=True)
    assert got == pytest.approx(skm.log_loss(y, normalised, sample_weight=weights[y]))
    by_hand = -np.sum(weights[y] * np.log(normalised[np.arange(200), y])) / weights[y].sum()
    assert got == pytest.approx(by_hand)
    # differs from the unweighted loss
    assert abs(got - skm.log_loss(y, normalised)) > 1e-3


def test_rsna_weighted_log_loss_clips_zero_probability():
    y = np.array([2, 0])
    probs = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    eps = np.finfo(np.float64).eps
    assert rsna_weighted_log_loss(y, probs) == pytest.approx(-4 * np.log(eps) / 5)


def test_rsna_weights_length_checked():
    with pytest.raises(ValueError, match="weights"):
        rsna_weighted_log_loss([0, 1], [[0.5, 0.5], [0.5, 0.5]])


# --------------------------------------------------------------------------- dead classes
def test_dead_classes():
    assert dead_classes(np.array([0, 0, 2, 2]), 4) == [1, 3]
    assert dead_classes(torch.tensor([0, 1, 2]), 3) == []


def test_dead_class_names_from_counts_and_metric_dicts():
    assert dead_class_names({"LGG": 0.0, "HGG": 12.0, "x": float("nan")}) == ["LGG"]
    metrics = {"val/pred_count_LGG": 0.0, "val/pred_count_HGG": 7.0, "test/pred_count_LGG": 3.0, "val/auc": 0.0}
    assert pred_counts(metrics) == {"LGG": 0.0, "HGG": 7.0}
    assert pred_counts(metrics, "test/") == {"LGG": 3.0}
    assert dead_class_names(pred_counts(metrics)) == ["LGG"] and dead_class_names(pred_counts(metrics, "test/")) == []
    # classification_metrics' dead_class_count agrees with the rule on its own pred counts
    y_true, probs = np.array([0, 1, 2, 2]), np.array([[0.8, 0.1, 0.1]] * 2 + [[0.1, 0.1, 0.8]] * 2)
    out = classification_metrics(y_true, probs, ["a", "b", "c"])
    assert dead_class_names(pred_counts(out, "")) == ["b"] and out["dead_class_count"] == 1.0


def test_dead_class_monitor_patience():
    monitor = DeadClassMonitor(patience=2)
    assert monitor.update([5, 0, 3]) == []
    assert monitor.update([5, 0, 0]) == [1]
    assert monitor.update([5, 0, 0]) == [1, 2]
    assert monitor.update([5, 1, 0]) == [2]  # one prediction resets class 1
    assert monitor.update([5, 0, 4]) == []
    assert DeadClassMonitor(patience=1).update([0, 1]) == [0]
    with pytest.raises(ValueError):
        DeadClassMonitor(patience=0)
    with pytest.raises(ValueError):
        monitor.update([1, 2])


# --------------------------------------------------------------------------- alarms
def epoch_metrics(counts=(5, 5), train_loss=0.5, val_loss=0.6, bal_acc=0.7):
    m = {f"val/pred_count_{c}": float(n) for c, n in zip(["neg", "pos"], counts)}
    m.update({"train/loss": train_loss, "val/loss": val_loss, "val/balanced_accuracy": bal_acc})
    return m


def test_alarm_dead_class_fires_once_after_patience():
    alarms = Alarms(dead_class_patience=2)
    assert alarms.update(0, epoch_metrics(counts=(10, 0))) == []
    fired = alarms.update(1, epoch_metrics(counts=(10, 0)))
    assert [a.name for a in fired] == ["dead_class"] and fired[0].epoch == 1
    assert "pos" in fired[0].message
    assert isinstance(fired[0], Alarm)
    assert alarms.update(2, epoch_metrics(counts=(10, 0))) == []  # remembered
    assert "dead_class" in alarms.fired


def test_alarm_overfitting_threshold():
    alarms = Alarms(loss_gap_threshold=0.5)
    assert alarms.update(0, epoch_metrics(train_loss=0.2, val_loss=0.69)) == []
    fired = alarms.update(1, epoch_metrics(train_loss=0.2, val_loss=0.71))
    assert [a.name for a in fired] == ["overfitting"]
    assert alarms.update(2, epoch_metrics(train_loss=0.1, val_loss=2.0)) == []
    assert [a.name for a in Alarms(loss_gap_threshold=0.05).update(0, epoch_metrics())] == [
        "overfitting"
    ]


def test_alarm_unstable_balanced_accuracy():
    steady = Alarms()
    for epoch, value in enumerate([0.70, 0.72, 0.71, 0.73, 0.70, 0.72]):
        assert steady.update(epoch, epoch_metrics(bal_acc=value)) == []
    swinging = Alarms(bal_acc_var_window=5, bal_acc_var_threshold=0.01)
    # around its line (flat) the variance is 0.0216; around the isotonic fit (by hand: PAVA pools to
    # [0.5, .65, .65, .65, .65], residuals 0, .15, -.15, .15, -.15) 0.018: the smaller is what counts
    values = [0.5, 0.8, 0.5, 0.8, 0.5]
    assert unexplained_variance(values) == pytest.approx(0.018)
    results = [swinging.update(e, epoch_metrics(bal_acc=v)) for e, v in enumerate(values)]
    assert all(r == [] for r in results[:4])
    assert [a.name for a in results[4]] == ["unstable"] and results[4][0].epoch == 4
    assert "0.0180 > 0.01" in results[4][0].message
    # a more lenient threshold lets the same series pass
    lenient = Alarms(bal_acc_var_threshold=0.05)
    assert all(lenient.update(e, epoch_metrics(bal_acc=v)) == [] for e, v in enumerate(values))
    # a model that is learning is not unstable: raw variance 0.0184 > 0.01, but around the
    # least-squares line (slope 0.09, by hand: residuals .02 -.07 .04 .05 -.04) only 0.0022, and the
    # curve never falls, so the isotonic fit is exact (0)
    learning = [0.5, 0.5, 0.7, 0.8, 0.8]
    assert np.var(learning) == pytest.approx(0.0184)
    assert np.var([0.02, -0.07, 0.04, 0.05, -0.04]) == pytest.approx(0.0022)
    assert unexplained_variance(learning) == pytest.approx(0.0, abs=1e-12)
    rising = Alarms(bal_acc_var_window=5, bal_acc_var_threshold=0.01)
    assert all(rising.update(e, epoch_metrics(bal_acc=v)) == [] for e, v in enumerate(learning))
    # a late start (the demo's fold 0: at chance for three epochs, then 0.86): around the line 0.0133
    # would fire; the isotonic fit pools 0.5, 0.44 to 0.47 (residuals .03 -.03 0 0): 0.00045
    late = [0.5, 0.44, 0.5, 0.86]
    epochs = np.arange(4.0)
    assert np.var(late - np.polyval(np.polyfit(epochs, late, 1), epochs)) > 0.01
    assert unexplained_variance(late) == pytest.approx(0.00045)
    late_start = Alarms(bal_acc_var_window=4)
    assert all(late_start.update(e, epoch_metrics(bal_acc=v)) == [] for e, v in enumerate(late))
    # a steady decline is explained by the line
    assert unexplained_variance([0.9, 0.8, 0.7, 0.6]) == pytest.approx(0.0, abs=1e-12)


def test_alarms_skip_missing_keys():
    assert Alarms().update(0, {"val/balanced_accuracy": 0.5}) == []


def test_probs_rejects_logits_but_tolerates_round_off():
    with pytest.raises(ValueError, match="non-negative"):
        classification_metrics([0, 1], [[2.0, -1.0], [0.5, 0.5]], ["a", "b"])
    m = classification_metrics([0, 1], [[1.0 + 1e-9, -1e-9], [0.2, 0.8]], ["a", "b"])
    assert m["accuracy"] == 1.0
