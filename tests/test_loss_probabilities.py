"""Every loss's probabilities for metrics come from the logits it trains on (scaled, ordinal,
sigmoid), each checked against an independent numpy formula, and predict()/validation_metrics
(hence train's best_val/* and evaluate) use them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn

from losslab.engine.steps import predict, validation_metrics
from losslab.losses import build_loss

COUNTS = [50, 12, 4]


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _cosines(n: int = 40, k: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, k))


def test_ldam_probabilities_are_the_softmax_of_the_scaled_cosines():
    z = _cosines()
    loss = build_loss("ldam", class_counts=COUNTS, num_classes=3, s=30.0)
    got = loss.probabilities(torch.as_tensor(z, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, np_softmax(30.0 * z), atol=1e-12)
    # the unscaled softmax is nearly flat: the fix changes the numbers, not only the code
    assert np.abs(np_softmax(z) - np_softmax(30.0 * z)).max() > 0.3
    # the scale does not change the decision
    assert np.array_equal(loss.predict(torch.as_tensor(z)).numpy(), z.argmax(1))


@pytest.mark.parametrize("kind", ["coral", "corn"])
def test_ordinal_probabilities_match_an_independent_formula(kind):
    rng = np.random.default_rng(1)
    z = np.sort(rng.normal(0, 2, size=(25, 3)), axis=1)[:, ::-1].copy()  # rank-consistent: non-increasing
    loss = build_loss(kind, num_classes=4, class_counts=[10, 6, 3, 1])
    got = loss.probabilities(torch.as_tensor(z)).numpy()
    sig = np_sigmoid(z)
    # P(y > k): CORAL σ(z_k); CORN the chain rule Π_{j<=k} σ(z_j), written out term by term
    if kind == "coral":
        greater = sig
    else:
        greater = np.stack([sig[:, 0], sig[:, 0] * sig[:, 1], sig[:, 0] * sig[:, 1] * sig[:, 2]], axis=1)
    expected = np.empty((25, 4))
    expected[:, 0] = 1 - greater[:, 0]
    expected[:, 1] = greater[:, 0] - greater[:, 1]
    expected[:, 2] = greater[:, 1] - greater[:, 2]
    expected[:, 3] = greater[:, 2]
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_sigmoid_focal_probabilities_match_an_independent_formula():
    z = _cosines(seed=2) * 4
    multi = build_loss("focal", mode="sigmoid", gamma=2.0)
    sig = np_sigmoid(z)
    np.testing.assert_allclose(multi.probabilities(torch.as_tensor(z)).numpy(), sig / sig.sum(1, keepdims=True),
                               atol=1e-12)
    binary = build_loss("focal", mode="sigmoid", gamma=2.0)
    one = z[:, :1]
    np.testing.assert_allclose(binary.probabilities(torch.as_tensor(one)).numpy(),
                               np.concatenate([1 - np_sigmoid(one), np_sigmoid(one)], axis=1), atol=1e-12)


class _FixedLogits(nn.Module):
    """A "model" whose logits are the first instance's first pixel row (so predict() sees known logits)."""

    def forward(self, image, mask=None):
        return image[:, 0, 0, 0, :]


def _loader(z: np.ndarray, y: np.ndarray):
    images = torch.as_tensor(z, dtype=torch.float32).reshape(len(z), 1, 1, 1, z.shape[1])
    return [{"image": images[i:i + 10], "mask": torch.ones(len(images[i:i + 10]), 1, dtype=torch.bool),
             "label": torch.as_tensor(y[i:i + 10]), "index": torch.arange(i, min(i + 10, len(z)))}
            for i in range(0, len(z), 10)]


@pytest.mark.parametrize("name, kwargs, to_probs", [
    ("ldam", {"class_counts": COUNTS, "num_classes": 3, "s": 30.0}, lambda z: np_softmax(30.0 * z)),
    ("coral", {"num_classes": 3, "class_counts": COUNTS}, None),
    ("focal", {"mode": "sigmoid"}, lambda z: np_sigmoid(z) / np_sigmoid(z).sum(1, keepdims=True)),
])
def test_validation_metrics_use_the_losss_probabilities(name, kwargs, to_probs):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 40)
    z = _cosines(40, 2 if name == "coral" else 3, seed=4) + (0.3 * np.eye(3)[y][:, :2] if name == "coral" else 0.5 * np.eye(3)[y])
    z = z.astype(np.float32)
    loss = build_loss(name, **kwargs)
    outputs = predict(_FixedLogits(), _loader(z, y), torch.device("cpu"), loss)
    if to_probs is None:  # CORAL: P(y=0)=1-σ0, P(y=1)=σ0-σ1 (clamped at 0, renormalised), P(y=2)=σ1
        s = np_sigmoid(z.astype(np.float64))
        raw = np.clip(np.stack([1 - s[:, 0], s[:, 0] - s[:, 1], s[:, 1]], axis=1), 0, None)
        expected = raw / raw.sum(1, keepdims=True)
    else:
        expected = to_probs(z.astype(np.float64))
    np.testing.assert_allclose(outputs["probs"], expected, atol=1e-5)
    metrics = validation_metrics(outputs, ["a", "b", "c"], loss)
    assert metrics["val/auc"] == pytest.approx(roc_auc_score(y, expected, multi_class="ovr"), abs=1e-6)
    assert metrics["val/log_loss"] == pytest.approx(log_loss(y, expected, labels=[0, 1, 2]), abs=1e-5)
    if name == "ldam":  # the old rule (softmax of the raw cosines) gives other numbers
        assert abs(metrics["val/log_loss"] - log_loss(y, np_softmax(z.astype(np.float64)), labels=[0, 1, 2])) > 0.05
