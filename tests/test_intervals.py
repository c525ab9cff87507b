"""Patient-level bootstrap intervals: the resampled statistic equals classification_metrics, the
interval agrees with SciPy's percentile bootstrap when every case is its own patient, patients are
resampled as wholes, and undefined resamples are left out."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from losslab.engine.intervals import fast_metrics, grouped_bootstrap, interval_metrics
from losslab.engine.metrics import classification_metrics

NAMES = ["LGG", "HGG"]


def _cases(n: int, k: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k)) + 1.2 * np.eye(k)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs, probs.argmax(1)


@pytest.mark.parametrize("k", [2, 3])
def test_fast_metrics_equal_classification_metrics(k):
    names = [f"c{i}" for i in range(k)]
    y, probs, pred = _cases(60, k, seed=k)
    pred[:5] = (pred[:5] + 1) % k  # some errors of every kind
    fast = fast_metrics(y, probs, pred, names)
    reference = classification_metrics(y, probs, names, y_pred=pred)
    for key, value in fast.items():
        assert value == pytest.approx(reference[key], abs=1e-12), key


def test_a_missing_class_leaves_its_recall_and_auc_undefined():
    fast = fast_metrics(np.array([1, 1, 1]), np.array([[0.2, 0.8]] * 3), np.array([1, 0, 1]), NAMES)
    assert np.isnan(fast["recall_LGG"]) and np.isnan(fast["auc"])
    assert fast["recall_HGG"] == pytest.approx(2 / 3) and fast["balanced_accuracy"] == pytest.approx(2 / 3)
    # macro F1 over both labels: HGG 2·2/(2·2+0+1) = 0.8; LGG has 0 true positives and 1 false one -> 0
    assert fast["f1_macro"] == pytest.approx(0.4)


def test_one_case_per_patient_agrees_with_scipys_percentile_bootstrap():
    y, probs, pred = _cases(150, seed=1)
    ours = grouped_bootstrap(y, probs, pred, np.arange(150), NAMES, n_resamples=4000, seed=0)

    def balanced_accuracy(idx):
        idx = idx.astype(int)
        return fast_metrics(y[idx], probs[idx], pred[idx], NAMES)["balanced_accuracy"]

    scipy_ci = stats.bootstrap((np.arange(150),), balanced_accuracy, vectorized=False, n_resamples=4000,
                               method="percentile", random_state=np.random.default_rng(1)).confidence_interval
    assert ours["balanced_accuracy"].low == pytest.approx(scipy_ci.low, abs=0.015)
    assert ours["balanced_accuracy"].high == pytest.approx(scipy_ci.high, abs=0.015)
    point = classification_metrics(y, probs, NAMES, y_pred=pred)["balanced_accuracy"]
    assert ours["balanced_accuracy"].low < point < ours["balanced_accuracy"].high
    assert ours["balanced_accuracy"].n_valid == 4000


def test_patients_are_resampled_whole():
    """Three identical copies of each patient's case: resampling patients gives exactly the intervals
    of one case per patient (same draws); resampling the copies as cases would give narrower ones."""
    y, probs, pred = _cases(40, seed=2)
    one = grouped_bootstrap(y, probs, pred, np.arange(40), NAMES, n_resamples=300, seed=5)
    rep = np.repeat(np.arange(40), 3)
    tripled = grouped_bootstrap(y[rep], probs[rep], pred[rep], rep, NAMES, n_resamples=300, seed=5)
    as_cases = grouped_bootstrap(y[rep], probs[rep], pred[rep], np.arange(120), NAMES, n_resamples=300, seed=5)
    for key in one:
        assert tripled[key].low == pytest.approx(one[key].low, abs=1e-12), key
        assert tripled[key].high == pytest.approx(one[key].high, abs=1e-12), key
    width = lambda r: r["balanced_accuracy"].high - r["balanced_accuracy"].low  # noqa: E731
    assert width(as_cases) < 0.8 * width(one)


def test_hand_worked_degenerate_interval_and_dropped_resamples():
    # every case right: every resample has balanced accuracy 1 -> the interval is [1, 1]
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    ci = grouped_bootstrap(y, probs, probs.argmax(1), ["p1", "p1", "p2", "p2"], NAMES, n_resamples=200, seed=0)
    assert (ci["balanced_accuracy"].low, ci["balanced_accuracy"].high) == (1.0, 1.0)
    # two patients, one per class: a resample draws both (prob 1/2) or one twice; AUC is defined only
    # when both are drawn, so about half the resamples are left out for AUC and recall, none for F1
    assert 70 < ci["auc"].n_valid < 130 and ci["recall_LGG"].n_valid < 200 and ci["f1_macro"].n_valid == 200


def test_interval_metrics_names_and_errors():
    y, probs, pred = _cases(30, seed=3)
    out = interval_metrics({"labels": y, "probs": probs, "pred": pred}, np.arange(30), NAMES, "test",
                           n_resamples=50)
    assert set(out) == {f"test/{m}_ci_{side}" for m in ("balanced_accuracy", "f1_macro", "auc", "recall_LGG",
                                                         "recall_HGG") for side in ("low", "high")}
    assert all(out[f"test/{m}_ci_low"] <= out[f"test/{m}_ci_high"] for m in ("auc", "f1_macro"))
    with pytest.raises(ValueError, match="one row per case"):
        grouped_bootstrap(y, probs, pred[:-1], np.arange(30), NAMES)
