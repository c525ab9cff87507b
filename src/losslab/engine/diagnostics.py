"""Diagnostics of multiple-instance (MIL) heads: how concentrated is the attention?

Shapes at this module's boundary:
    attention       ``(B, N)`` non-negative weights over the ``N`` instances (slices) of each bag
    mask            ``(B, N)`` bool, True = a real instance, False = padding; None = all valid
    instance_probs  ``(B, N)`` probability of the positive class per instance, or ``(B, N, K)``

Inputs may be numpy arrays or torch tensors. Results are plain python floats. MLflow-free.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.special import entr

from losslab.engine.metrics import to_numpy

__all__ = ["attention_statistics", "selection_confidence"]


def _mask(mask: Any | None, shape: tuple[int, int]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = to_numpy(mask).astype(bool)
    if m.shape != shape:
        raise ValueError(f"mask has shape {m.shape}, expected {shape}")
    return m


def attention_statistics(attention: Any, mask: Any | None = None) -> dict[str, float]:
    """Concentration of MIL attention, averaged over bags.

    For each bag the weights of valid instances are renormalised to sum to one (a no-op for a
    masked softmax; padding never counts), then with ``n`` valid instances:

    - ``attention_entropy``: :math:`H = -\\sum_i a_i \\log a_i` (natural log, ``0 log 0 = 0``,
      via ``scipy.special.entr``); ``log n`` for uniform attention, 0 for one-hot.
    - ``attention_entropy_normalised``: :math:`H / \\log n` in ``[0, 1]``; defined as 0 when
      ``n = 1`` (a single instance is fully attended).
    - ``attention_top1``: :math:`\\max_i a_i`; ``1/n`` uniform, 1 one-hot.
    - ``effective_instances``: :math:`1 / \\sum_i a_i^2` (inverse Simpson / participation
      ratio); ``n`` uniform, 1 one-hot.

    Bags with no valid instance, or whose valid weights sum to zero, are skipped; if every bag
    is skipped all values are NaN.

    Args:
        attention: ``(B, N)`` non-negative weights (``(N,)`` is read as one bag).
        mask: ``(B, N)`` bool or None.

    Returns:
        dict with the four keys above, as floats.

    Raises:
        ValueError: on wrong shapes or negative weights.
    """
    a = to_numpy(attention).astype(np.float64)
    if a.ndim == 1:
        a = a[None, :]
        mask = None if mask is None else to_numpy(mask).reshape(1, -1)
    if a.ndim != 2:
        raise ValueError(f"attention must have shape (B, N), got {a.shape}")
    if np.any(a < 0):
        raise ValueError("attention weights must be non-negative")
    valid = _mask(mask, a.shape)
    a = np.where(valid, a, 0.0)
    total = a.sum(axis=1)
    keep = total > 0
    nan = float("nan")
    if not np.any(keep):
        return {
            "attention_entropy": nan,
            "attention_entropy_normalised": nan,
            "attention_top1": nan,
            "effective_instances": nan,
        }
    a = a[keep] / total[keep, None]
    n_valid = valid[keep].sum(axis=1)
    entropy = entr(a).sum(axis=1)
    log_n = np.log(np.maximum(n_valid, 1))
    normalised = np.divide(entropy, log_n, out=np.zeros_like(entropy), where=n_valid > 1)
    return {
        "attention_entropy": float(entropy.mean()),
        "attention_entropy_normalised": float(normalised.mean()),
        "attention_top1": float(a.max(axis=1).mean()),
        "effective_instances": float((1.0 / np.sum(a**2, axis=1)).mean()),
    }


def selection_confidence(instance_probs: Any, mask: Any | None = None) -> float:
    """Mean confidence of the *critical instance* of each bag (DSMIL).

    DSMIL (Li, Li & Eliceiri, "Dual-stream Multiple Instance Learning Network for Whole Slide
    Image Classification with Self-supervised Contrastive Learning", CVPR 2021,
    arXiv:2011.08939) picks, for each class, the critical instance as the one with the highest
    instance-classifier score. Definition used here:

    - ``(B, N)`` input (probability of the positive class per instance): the critical instance
      is ``argmax_i p_i`` over valid instances, and its confidence is ``max_i p_i``.
    - ``(B, N, K)`` input: for each class the critical instance is ``argmax_i p_{i,k}``; the
      bag's selection confidence is the highest of those scores, ``max_k max_i p_{i,k}``
      (the probability that the most confidently selected instance assigns to its class).

    The result is the mean over bags (bags with no valid instance are skipped). High values
    mean the instance stream commits to one instance; values near ``1/K`` (or near the prior
    for ``(B, N)``) mean no instance stands out.

    Args:
        instance_probs: ``(B, N)`` or ``(B, N, K)`` probabilities.
        mask: ``(B, N)`` bool or None.

    Returns:
        float in ``[0, 1]``; NaN if no bag has a valid instance.
    """
    p = to_numpy(instance_probs).astype(np.float64)
    if p.ndim not in (2, 3):
        raise ValueError(f"instance_probs must have shape (B, N) or (B, N, K), got {p.shape}")
    valid = _mask(mask, p.shape[:2])
    per_instance = p if p.ndim == 2 else p.max(axis=2)
    scores = np.where(valid, per_instance, -np.inf).max(axis=1)
    scores = scores[np.isfinite(scores)]
    return float(scores.mean()) if scores.size else math.nan
