"""Ordinal regression losses with K−1 binary logits: ``coral`` and ``corn``.

Shapes: ``logits (B, K−1)`` float (the head is built with ``output_dim(K) == K − 1``), ``target (B,)``
long in ``[0, K)``. ``probabilities(logits) -> (B, K)`` and ``predict(logits) -> (B,)`` convert the
K−1 logits to class probabilities and ranks (also available as the pure functions below).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .base import LossBase, check_per_class
from .registry import register_loss

__all__ = [
    "CoralLoss",
    "CornLoss",
    "ordinal_levels",
    "coral_loss",
    "coral_probabilities",
    "coral_predict",
    "corn_loss",
    "corn_probabilities",
    "corn_predict",
]


def ordinal_levels(target: torch.Tensor, num_thresholds: int) -> torch.Tensor:
    """Extended binary labels ``(B, K−1)``: ``levels[i, k] = 1[y_i > k]``."""
    ranks = torch.arange(num_thresholds, device=target.device)
    return (target.unsqueeze(1) > ranks).float()


def _binary_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # log σ(z)·t + log(1 − σ(z))·(1 − t), with log(1 − σ(z)) = log σ(z) − z
    log_sig = F.logsigmoid(logits)
    return log_sig * labels + (log_sig - logits) * (1 - labels)


# ------------------------------------------------------------------------------------------ CORAL
def coral_loss(logits: torch.Tensor, target: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Unreduced CORAL loss ``(B,)``: ``−Σ_k λ_k [t_k log σ(z_k) + (1 − t_k) log(1 − σ(z_k))]``, ``t_k = 1[y > k]``."""
    ll = _binary_log_likelihood(logits, ordinal_levels(target, logits.shape[1]).to(logits.dtype))
    if importance is not None:
        ll = ll * importance
    return -ll.sum(dim=1)


def coral_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``(B, K)`` from CORAL logits ``(B, K−1)``.

    ``P(y > k) = σ(z_k)``; ``P(y = k) = P(y > k−1) − P(y > k)`` with ``P(y > −1) = 1``, ``P(y > K−1) = 0``.
    Rank-consistent logits (CORAL's shared-weight head) give non-increasing ``σ(z_k)``; otherwise the
    differences are clamped at 0 and the row renormalised.
    """
    p_greater = torch.sigmoid(logits)
    ones = torch.ones_like(p_greater[:, :1])
    upper = torch.cat([ones, p_greater], dim=1)
    lower = torch.cat([p_greater, torch.zeros_like(ones)], dim=1)
    probs = (upper - lower).clamp(min=0)
    return probs / probs.sum(dim=1, keepdim=True).clamp(min=1e-12)


def coral_predict(logits: torch.Tensor) -> torch.Tensor:
    """Predicted rank ``(B,)``: the number of ``σ(z_k) > 0.5`` (i.e. ``z_k > 0``)."""
    return (logits > 0).sum(dim=1)


@register_loss("coral")
class CoralLoss(LossBase):
    """CORAL: consistent rank logits for ordinal regression.

    Cao, Mirjalili, Raschka, "Rank consistent ordinal regression for neural networks with application to
    age estimation", Pattern Recognition Letters 2020, arXiv:1901.07884.

    The K ordered classes become K−1 binary problems ``y > k``; ``L = −Σ_k λ_k [t_k log σ(z_k) +
    (1 − t_k) log(1 − σ(z_k))]`` with ``t_k = 1[y > k]`` (as ``coral_pytorch.losses.coral_loss``: sum over
    the binary problems, mean over samples). Rank consistency comes from the head (one shared weight vector, K−1
    biases); the loss also works with an ordinary ``Linear(D, K−1)``.

    Args:
        importance_weights: optional λ, a list of K−1 numbers ≥ 0 (default all 1).
        num_classes: K (checks the length of ``importance_weights``).
        reduction: ``mean`` | ``sum`` | ``none``.

    Raises:
        ValueError: ``importance_weights`` of the wrong length or negative; bad ``reduction``.

    >>> loss = CoralLoss()
    >>> loss.output_dim(4)
    3
    >>> coral_predict(torch.tensor([[2.0, 0.5, -1.0]])).tolist()
    [2]

    YAML (``configs/loss/coral.yaml``)::

        name: coral
        importance_weights: null
    """

    family = "ordinal"

    def __init__(
        self,
        importance_weights: Sequence[float] | None = None,
        num_classes: int | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction)
        importance = None
        if importance_weights is not None:
            thresholds = None if num_classes is None else num_classes - 1
            values = check_per_class(self.name, "importance_weights", importance_weights, thresholds,
                                     f"rank thresholds, num_classes - 1 = {thresholds}")
            importance = torch.tensor(values, dtype=torch.float32)
        self.register_buffer("importance_weights", importance)

    def output_dim(self, num_classes: int) -> int:
        return num_classes - 1

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return coral_probabilities(logits)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return coral_predict(logits)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.reduce(coral_loss(logits, target, self.importance_weights))


# ------------------------------------------------------------------------------------------- CORN
def corn_loss(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unreduced CORN loss: (per-sample loss ``(B,)``, per-sample number of binary problems ``(B,)``).

    Binary problem k (``z_k`` models ``P(y > k | y > k−1)``) is trained only on samples with ``y ≥ k``
    (problem 0 on all samples), label ``1[y > k]``: ``l_i = −Σ_{k ≤ min(y_i, K−2)} [t_ik log σ(z_ik) + (1 − t_ik) log(1 − σ(z_ik))]``.
    """
    num_thresholds = logits.shape[1]
    ranks = torch.arange(num_thresholds, device=target.device)
    in_subset = (target.unsqueeze(1) >= ranks).to(logits.dtype)  # sample i is in the subset of problem k
    ll = _binary_log_likelihood(logits, ordinal_levels(target, num_thresholds).to(logits.dtype))
    return -(ll * in_subset).sum(dim=1), in_subset.sum(dim=1)


def corn_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``(B, K)`` from CORN logits: ``P(y > k) = Π_{j ≤ k} σ(z_j)``, then differences."""
    p_greater = torch.cumprod(torch.sigmoid(logits), dim=1)
    ones = torch.ones_like(p_greater[:, :1])
    upper = torch.cat([ones, p_greater], dim=1)
    lower = torch.cat([p_greater, torch.zeros_like(ones)], dim=1)
    return upper - lower


def corn_predict(logits: torch.Tensor) -> torch.Tensor:
    """Predicted rank ``(B,)``: the number of ``P(y > k) = Π_{j ≤ k} σ(z_j) > 0.5``."""
    return (torch.cumprod(torch.sigmoid(logits), dim=1) > 0.5).sum(dim=1)


@register_loss("corn")
class CornLoss(LossBase):
    """CORN: conditional ordinal regression with K−1 conditional binary problems.

    Shi, Cao, Raschka, "Deep Neural Networks for Rank-Consistent Ordinal Regression Based On Conditional
    Probabilities", Pattern Analysis and Applications 2023, arXiv:2111.08851.

    Logit ``z_k`` models ``P(y > k | y > k−1)``; problem k is trained on the samples with ``y ≥ k`` only.
    ``reduction="mean"`` divides the summed binary losses by the number of (sample, problem) pairs, as the
    reference ``coral_pytorch.losses.corn_loss`` does (a weighted mean over samples, each weighted by its
    number of problems); ``none`` gives each sample's summed binary losses; ``sum`` their sum.
    ``P(y > k) = Π_{j ≤ k} σ(z_j)`` is rank-consistent by construction.

    Args:
        num_classes: K (unused; accepted for the pipeline).
        reduction: ``mean`` | ``sum`` | ``none``.

    Raises:
        ValueError: bad ``reduction``.

    >>> CornLoss().output_dim(3)
    2
    >>> corn_probabilities(torch.zeros(1, 2)).tolist()
    [[0.5, 0.25, 0.25]]

    YAML (``configs/loss/corn.yaml``)::

        name: corn
    """

    family = "ordinal"

    def __init__(self, num_classes: int | None = None, reduction: str = "mean") -> None:
        super().__init__(reduction)

    def output_dim(self, num_classes: int) -> int:
        return num_classes - 1

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return corn_probabilities(logits)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return corn_predict(logits)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        values, num_problems = corn_loss(logits, target)
        if self.reduction == "mean":
            return values.sum() / num_problems.sum()
        return self.reduce(values)
