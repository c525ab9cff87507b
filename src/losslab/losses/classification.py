"""Classification losses for imbalanced data: ``ce``, ``focal``, ``ldam``, ``logit_adjusted``,
``balanced_softmax``, ``class_balanced``; plus the cosine classifier head :class:`NormedLinear`.

Shapes: ``logits (B, K)`` float, ``target (B,)`` long in ``[0, K)`` (or ``ignore_index``).
Each loss is a pure ``*_loss`` function returning unreduced per-sample values ``(B,)`` plus a
registered ``nn.Module`` that reduces them.

Class weights (``class_weights``) are, everywhere in this module, either a list of K numbers used as
given (e.g. the RSNA competition weights ``[1, 2, 4]``) or ``inverse_freq``, ``sqrt_inverse_freq`` or
``effective_number`` computed from ``class_counts`` (normalised to sum to K). With class weights,
``reduction="mean"`` is the *weighted* mean ``Σ_i w_{y_i} l_i / Σ_i w_{y_i}`` over non-ignored samples,
exactly as ``torch.nn.functional.cross_entropy`` does; without them it is the mean over non-ignored
samples. ``reduction="none"`` returns ``w_{y_i} l_i`` (0 for ignored samples).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    LossBase,
    check_bool,
    check_choice,
    check_class_counts,
    check_number,
    check_per_class,
    class_weights_from_counts,
    expected_classes,
    resolve_class_weights,
)
from .registry import register_loss

__all__ = [
    "NormedLinear",
    "CrossEntropyLoss",
    "FocalLoss",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "BalancedSoftmaxLoss",
    "ClassBalancedLoss",
    "cross_entropy_loss",
    "softmax_focal_loss",
    "sigmoid_focal_loss",
    "ldam_margins",
    "ldam_loss",
    "logit_adjusted_loss",
    "weighted_mean",
]


# --------------------------------------------------------------------------------------- helpers
def weighted_mean(
    values: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None, ignore_index: int
) -> torch.Tensor:
    """``Σ values / Σ w_{y_i}`` over non-ignored samples (``w = 1`` without class weights).

    ``values`` are per-sample losses that already include the class weight (0 where ignored). All
    samples ignored gives NaN, as in ``F.cross_entropy``.
    """
    valid = target != ignore_index
    if class_weights is None:
        return values.sum() / valid.sum()
    w = class_weights[target.clamp(0, class_weights.numel() - 1)] * valid
    return values.sum() / w.sum()


def _reduce(values, target, class_weights, ignore_index, reduction):
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    return weighted_mean(values, target, class_weights, ignore_index)


class NormedLinear(nn.Module):
    """Cosine classifier head: ``logits = normalize(x) @ normalize(W)``, values in ``[-1, 1]``.

    The head LDAM expects (Cao et al. 2019 use it with ``s = 30``). Input ``(B, in_features)``,
    output ``(B, out_features)``. It lives here, in ``losslab.losses.classification``; the model
    builder can pick it when ``loss.head == "normed_linear"``.

    >>> head = NormedLinear(8, 3)
    >>> bool(head(torch.randn(4, 8)).abs().max() <= 1.0 + 1e-6)
    True
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        # the reference initialisation: uniform, then unit-norm columns
        self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_features) -> (..., out_features)`` (e.g. the instances of a bag, ``(B, N, D)``)."""
        return F.normalize(x, dim=-1).matmul(F.normalize(self.weight, dim=0))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# -------------------------------------------------------------------------------------------- ce
def cross_entropy_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Unreduced (weighted) cross-entropy ``(B,)``: ``−w_y Σ_c q_c log softmax(z)_c``.

    ``q`` is the one-hot target smoothed by ``label_smoothing`` (``q = (1−ε) onehot + ε/K``).
    Zero for samples with ``target == ignore_index``.
    """
    return F.cross_entropy(logits, target, weight=class_weights, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction="none")


@register_loss("ce")
class CrossEntropyLoss(LossBase):
    """Cross-entropy with class weights, label smoothing and ``ignore_index`` (``F.cross_entropy`` underneath).

    ``L = −w_y Σ_c q_c log p_c`` with ``p = softmax(z)``, ``q = (1−ε)·onehot(y) + ε/K`` and ``w_y`` the
    weight of the target class; ``reduction="mean"`` is ``Σ_i L_i / Σ_i w_{y_i}`` (torch's convention).

    Class weights from counts ``n_c`` (normalised to sum to K): ``inverse_freq`` ``1/n_c``,
    ``sqrt_inverse_freq`` ``1/√n_c``, ``effective_number`` ``(1−β)/(1−β^{n_c})`` from
    Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019, arXiv:1901.05555.

    Args:
        class_weights: None (default), a list of K numbers ≥ 0, or ``inverse_freq`` |
            ``sqrt_inverse_freq`` | ``effective_number``.
        class_counts: per-class training counts (needed by the computed weight schemes).
        num_classes: K; checks the length of ``class_weights``.
        beta: β of ``effective_number``, in ``[0, 1)``; default 0.9999.
        label_smoothing: ε in ``[0, 1]``; default 0.
        ignore_index: target value that contributes nothing; default −100.
        reduction: ``mean`` | ``sum`` | ``none``.

    Raises:
        ValueError: weights of the wrong length or negative, unknown scheme, scheme without
            ``class_counts``, ε or β out of range, bad ``reduction``.
        TypeError: a parameter of the wrong type.

    >>> z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    >>> torch.allclose(CrossEntropyLoss()(z, y), F.cross_entropy(z, y))
    True

    YAML (``configs/loss/ce.yaml``)::

        name: ce
        class_weights: [1, 2, 4]   # or inverse_freq | sqrt_inverse_freq | effective_number
        label_smoothing: 0.0
    """

    def __init__(
        self,
        class_weights: Sequence[float] | str | None = None,
        class_counts: Sequence[float] | None = None,
        num_classes: int | None = None,
        beta: float = 0.9999,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction)
        beta = check_number(self.name, "beta", beta, minimum=0.0, maximum=1.0, max_inclusive=False)
        self.label_smoothing = check_number(self.name, "label_smoothing", label_smoothing, minimum=0.0, maximum=1.0)
        self.ignore_index = check_number(self.name, "ignore_index", ignore_index, integer=True)
        if num_classes is not None:
            num_classes = check_number(self.name, "num_classes", num_classes, minimum=2, integer=True)
        weight = resolve_class_weights(self.name, class_weights, class_counts, num_classes, beta)
        self.register_buffer("class_weights", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = self.class_weights
        if weight is not None and weight.dtype != logits.dtype:
            weight = weight.to(logits.dtype)
        return F.cross_entropy(logits, target, weight=weight, ignore_index=self.ignore_index,
                               label_smoothing=self.label_smoothing, reduction=self.reduction)


# ----------------------------------------------------------------------------------------- focal
def softmax_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: torch.Tensor | float | None = None,
    class_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Unreduced multi-class focal loss ``(B,)``: ``FL = −α_y w_y (1 − p_y)^γ log p_y``.

    ``p_y = softmax(z)_y`` is the probability of the target class, ``γ ≥ 0`` the focusing parameter,
    ``α_y`` a scalar or per-class balance factor, ``w_y`` a class weight. ``log p_y`` comes from
    ``log_softmax`` (stable) and ``p_y = exp(log p_y)``. Zero where ``target == ignore_index``.
    With ``γ = 0`` and no α this is the (weighted) cross-entropy.
    """
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    log_p = F.log_softmax(logits, dim=1).gather(1, safe_target.unsqueeze(1)).squeeze(1)
    loss = -log_p
    if gamma != 0:
        loss = loss * (1.0 - log_p.exp()).clamp(min=0.0).pow(gamma)
    if alpha is not None:
        loss = loss * (alpha[safe_target] if isinstance(alpha, torch.Tensor) else alpha)
    if class_weights is not None:
        loss = loss * class_weights[safe_target]
    return loss * valid


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, alpha: float | None = 0.25
) -> torch.Tensor:
    """Unreduced element-wise binary focal loss (same shape as ``logits``), as torchvision's.

    ``FL = −α_t (1 − p_t)^γ log p_t`` with ``p = σ(z)``, ``p_t = p`` if ``t = 1`` else ``1 − p``,
    ``α_t = α t + (1 − α)(1 − t)`` (no α weighting when ``alpha`` is None). ``−log p_t`` is the
    binary cross-entropy computed from logits: ``BCE(z, t) = max(z, 0) − z t + log(1 + e^{−|z|})``.
    """
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t).pow(gamma) if gamma != 0 else ce
    if alpha is not None:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


@register_loss("focal")
class FocalLoss(LossBase):
    """Focal loss (softmax multi-class or sigmoid binary), optionally on top of class-weighted CE.

    Reimplementation of the loss described in: Lin, Goyal, Girshick, He, Dollár, "Focal Loss for Dense
    Object Detection", ICCV 2017, arXiv:1708.02002.

    * ``mode="softmax"`` (default): ``FL = −α_y w_y (1 − p_y)^γ log p_y``, ``p = softmax(z)``; ``α`` is a
      scalar (multiplies every class) or a list of K per-class factors; head size K.
    * ``mode="sigmoid"``: torchvision's binary form ``−α_t (1 − p_t)^γ log p_t`` with ``p = σ(z)`` and
      ``α_t = α`` for positives, ``1 − α`` for negatives (α a scalar in ``[0, 1]``). With K = 2 the head
      has **one** logit (``output_dim(2) == 1``; logits ``(B,)`` or ``(B, 1)``, target ∈ {0, 1}); with
      K > 2 it is one-vs-rest over K logits and a sample's loss is the *sum* over its K binary terms
      (so ``sum`` reduction equals ``torchvision.ops.sigmoid_focal_loss(..., reduction="sum")``).

    ``w_y`` are class weights (same options as ``ce``); "focal modulation on top of competition-weighted
    CE" is ``focal`` with ``gamma: 1.5, class_weights: [1, 2, 4]``. With γ = 0 (and no α) it equals
    ``ce`` with the same class weights. ``reduction="mean"`` is ``Σ L_i / Σ w_{y_i}`` (α is not in the
    denominator), so γ = 0 matches ``F.cross_entropy`` exactly.

    Args:
        gamma: γ ≥ 0, default 2.0.
        alpha: None (default), a scalar (> 0; in ``[0, 1]`` for sigmoid) or a list of K values ≥ 0 (softmax).
        class_weights / class_counts / num_classes / beta: as in ``ce``.
        mode: ``softmax`` (default) or ``sigmoid``.
        ignore_index: target value that contributes nothing; default −100.
        reduction: ``mean`` | ``sum`` | ``none``.

    Raises:
        ValueError: γ < 0, α out of range or of the wrong length, bad class weights, bad mode/reduction.
        TypeError: a parameter of the wrong type.

    >>> z, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 2, 0])
    >>> torch.allclose(FocalLoss(gamma=0.0)(z, y), F.cross_entropy(z, y))
    True

    YAML (``configs/loss/focal.yaml``)::

        name: focal
        gamma: 1.5
        alpha: null
        class_weights: [1, 2, 4]
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        class_weights: Sequence[float] | str | None = None,
        class_counts: Sequence[float] | None = None,
        num_classes: int | None = None,
        beta: float = 0.9999,
        mode: str = "softmax",
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction)
        self.gamma = check_number(self.name, "gamma", gamma, minimum=0.0)
        self.mode = check_choice(self.name, "mode", mode, ("softmax", "sigmoid"))
        beta = check_number(self.name, "beta", beta, minimum=0.0, maximum=1.0, max_inclusive=False)
        self.ignore_index = check_number(self.name, "ignore_index", ignore_index, integer=True)
        if num_classes is not None:
            num_classes = check_number(self.name, "num_classes", num_classes, minimum=2, integer=True)
        self.alpha_scalar: float | None = None
        alpha_tensor = None
        if alpha is not None:
            if self.mode == "sigmoid":
                self.alpha_scalar = check_number(self.name, "alpha", alpha, minimum=0.0, maximum=1.0)
            elif isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
                self.alpha_scalar = check_number(self.name, "alpha", alpha, minimum=0.0, min_inclusive=False)
            else:
                values = check_per_class(self.name, "alpha", alpha, expected_classes(num_classes, class_counts))
                alpha_tensor = torch.tensor(values, dtype=torch.float32)
        self.register_buffer("alpha", alpha_tensor)
        weight = resolve_class_weights(self.name, class_weights, class_counts, num_classes, beta)
        self.register_buffer("class_weights", weight)

    def output_dim(self, num_classes: int) -> int:
        return 1 if self.mode == "sigmoid" and num_classes == 2 else num_classes

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        if self.mode == "softmax":
            return torch.softmax(logits, dim=1)
        if logits.dim() == 1 or logits.shape[1] == 1:
            p = torch.sigmoid(logits.reshape(-1))
            return torch.stack([1 - p, p], dim=1)
        p = torch.sigmoid(logits)
        return p / p.sum(dim=1, keepdim=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.mode == "softmax":
            alpha = self.alpha if self.alpha is not None else self.alpha_scalar
            values = softmax_focal_loss(logits, target, self.gamma, alpha, self.class_weights, self.ignore_index)
            return _reduce(values, target, self.class_weights, self.ignore_index, self.reduction)
        valid = target != self.ignore_index
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        if logits.dim() == 1 or logits.shape[1] == 1:
            z = logits.reshape(-1)
            values = sigmoid_focal_loss(z, safe_target.to(z.dtype), self.gamma, self.alpha_scalar)
        else:
            onehot = F.one_hot(safe_target, logits.shape[1]).to(logits.dtype)
            values = sigmoid_focal_loss(logits, onehot, self.gamma, self.alpha_scalar).sum(dim=1)
        if self.class_weights is not None:
            values = values * self.class_weights[safe_target]
        values = values * valid
        return _reduce(values, target, self.class_weights, self.ignore_index, self.reduction)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, mode={self.mode!r}, reduction={self.reduction!r}"


# ------------------------------------------------------------------------------------------ ldam
def ldam_margins(class_counts: Sequence[float], max_m: float = 0.5) -> torch.Tensor:
    """LDAM margins ``m_c = C / n_c^{1/4}`` with C chosen so that the largest margin is ``max_m``.

    >>> [round(m, 4) for m in ldam_margins([16, 1], max_m=0.5).tolist()]
    [0.25, 0.5]
    """
    counts = torch.tensor([max(float(c), 1.0) for c in class_counts], dtype=torch.float64)
    m = counts.pow(-0.25)
    return (m * (max_m / m.max())).float()


def ldam_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    margins: torch.Tensor,
    s: float = 30.0,
    class_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Unreduced LDAM loss ``(B,)``: ``−w_y log softmax(s · (z − m_y e_y))_y``.

    The target logit is lowered by its class margin ``m_y``; all logits are then scaled by ``s``.
    """
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    if class_weights is not None:
        class_weights = class_weights.to(logits.dtype)
    shifted = logits - F.one_hot(safe_target, logits.shape[1]).to(logits.dtype) * margins[safe_target].unsqueeze(1)
    return F.cross_entropy(s * shifted, target, weight=class_weights, ignore_index=ignore_index, reduction="none")


@register_loss("ldam")
class LDAMLoss(LossBase):
    """Label-distribution-aware margin loss with deferred re-weighting (DRW).

    Cao, Wei, Gaidon, Arechiga, Ma, "Learning Imbalanced Datasets with Label-Distribution-Aware Margin
    Loss", NeurIPS 2019, arXiv:1906.07413.

    ``L = −w_y log [ e^{s(z_y − m_y)} / (e^{s(z_y − m_y)} + Σ_{j≠y} e^{s z_j}) ]``, margins
    ``m_c ∝ n_c^{−1/4}`` scaled so the largest is ``max_m``. DRW: ``w = 1`` before epoch
    ``drw_start_epoch`` (0-based, set by ``on_epoch_start``), then effective-number weights
    ``w_c ∝ (1−β)/(1−β^{n_c})`` (β = ``drw_beta`` = 0.9999) normalised to sum to K.

    **Logits.** The paper (and this default, ``s = 30``) uses a cosine classifier whose logits are in
    ``[−1, 1]``: build the head with :class:`NormedLinear` (``LDAMLoss.head == "normed_linear"``).
    The loss does not normalise logits itself. With an ordinary linear head set ``s = 1`` (margins then
    act on raw logits). ``probabilities()`` is ``softmax(s · z)``: the scaled logits the loss trains on,
    without the margin (which only applies to the true class, unknown at test time). The softmax of
    the unscaled cosines would be nearly uniform (``e^{±1}``) and its AUC/ECE not comparable with other
    losses'. Predictions (argmax) are the same either way. With ``max_m = 0`` and ``s = 1`` LDAM
    equals ``ce``.

    Args:
        class_counts: per-class training counts (required).
        num_classes: K (checks ``class_counts``).
        max_m: largest margin, ≥ 0; default 0.5.
        s: logit scale, > 0; default 30.
        drw: use deferred re-weighting; default True.
        drw_start_epoch: first (0-based) epoch with DRW weights, ≥ 0; default 160 (of 200, as in the paper).
        drw_beta: β of the DRW effective-number weights, in ``[0, 1)``; default 0.9999.
        ignore_index / reduction: as in ``ce``.

    Raises:
        ValueError: missing or bad ``class_counts``, ``max_m < 0``, ``s <= 0``, bad DRW settings.

    >>> z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    >>> torch.allclose(LDAMLoss(class_counts=[50, 10, 5], max_m=0.0, s=1.0)(z, y), F.cross_entropy(z, y))
    True

    YAML (``configs/loss/ldam.yaml``)::

        name: ldam
        max_m: 0.5
        s: 30.0
        drw_start_epoch: 160
    """

    head = "normed_linear"

    def __init__(
        self,
        class_counts: Sequence[float] | None = None,
        num_classes: int | None = None,
        max_m: float = 0.5,
        s: float = 30.0,
        drw: bool = True,
        drw_start_epoch: int = 160,
        drw_beta: float = 0.9999,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction)
        counts = check_class_counts(self.name, class_counts, num_classes)
        self.max_m = check_number(self.name, "max_m", max_m, minimum=0.0)
        self.s = check_number(self.name, "s", s, minimum=0.0, min_inclusive=False)
        self.drw = check_bool(self.name, "drw", drw)
        self.drw_start_epoch = check_number(self.name, "drw_start_epoch", drw_start_epoch, minimum=0, integer=True)
        drw_beta = check_number(self.name, "drw_beta", drw_beta, minimum=0.0, maximum=1.0, max_inclusive=False)
        self.ignore_index = check_number(self.name, "ignore_index", ignore_index, integer=True)
        self.register_buffer("margins", ldam_margins(counts, self.max_m))
        self.register_buffer("drw_weights", class_weights_from_counts(counts, "effective_number", drw_beta))
        self.drw_active = False

    def on_epoch_start(self, epoch: int) -> None:
        """Switch the DRW class weights on from ``drw_start_epoch`` (and off before it)."""
        self.drw_active = self.drw and epoch >= self.drw_start_epoch

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """``softmax(s · z)`` ``(B, K)``: the scale the loss trains on, no margin."""
        return torch.softmax(self.s * logits, dim=1)

    @property
    def class_weights(self) -> torch.Tensor | None:
        """The class weights in use now (None before DRW starts)."""
        return self.drw_weights if self.drw_active else None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = self.class_weights
        values = ldam_loss(logits, target, self.margins, self.s, weight, self.ignore_index)
        return _reduce(values, target, weight, self.ignore_index, self.reduction)

    def extra_repr(self) -> str:
        return (f"max_m={self.max_m}, s={self.s}, drw={self.drw}, drw_start_epoch={self.drw_start_epoch}, "
                f"reduction={self.reduction!r}")


# ------------------------------------------------------------------------ logit adjustment family
def logit_adjusted_loss(
    logits: torch.Tensor, target: torch.Tensor, log_prior: torch.Tensor, tau: float = 1.0, ignore_index: int = -100
) -> torch.Tensor:
    """Unreduced logit-adjusted CE ``(B,)``: ``−log softmax(z + τ log π)_y``."""
    return F.cross_entropy(logits + tau * log_prior, target, ignore_index=ignore_index, reduction="none")


@register_loss("logit_adjusted")
class LogitAdjustedLoss(LossBase):
    """Logit-adjusted cross-entropy: CE on ``z_c + τ log π_c`` with class priors ``π_c = n_c / Σ n``.

    Menon, Jayasumana, Rawat, Jain, Veit, Kumar, "Long-tail learning via logit adjustment", ICLR 2021,
    arXiv:2007.07314. ``L = −log [ e^{z_y + τ log π_y} / Σ_c e^{z_c + τ log π_c} ]``.
    ``probabilities()`` is the softmax of the *unadjusted* logits (the balanced-error predictor).
    With τ = 0, or with balanced classes, it equals ``ce``.

    Args:
        class_counts: per-class training counts (required).
        num_classes: K (checks ``class_counts``).
        tau: τ, a finite number (usually ≥ 0); default 1.0.
        ignore_index / reduction: as in ``ce``.

    Raises:
        ValueError: missing or bad ``class_counts``, non-finite τ.

    >>> z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    >>> torch.allclose(LogitAdjustedLoss(class_counts=[50, 10, 5], tau=0.0)(z, y), F.cross_entropy(z, y))
    True

    YAML (``configs/loss/logit_adjusted.yaml``)::

        name: logit_adjusted
        tau: 1.0
    """

    def __init__(
        self,
        class_counts: Sequence[float] | None = None,
        num_classes: int | None = None,
        tau: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction)
        counts = check_class_counts(self.name, class_counts, num_classes)
        self.tau = check_number(self.name, "tau", tau)
        self.ignore_index = check_number(self.name, "ignore_index", ignore_index, integer=True)
        prior = torch.tensor([max(c, 1.0) for c in counts], dtype=torch.float64)
        self.register_buffer("log_prior", (prior / prior.sum()).log().float())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits + self.tau * self.log_prior, target, ignore_index=self.ignore_index,
                               reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, reduction={self.reduction!r}"


@register_loss("balanced_softmax")
class BalancedSoftmaxLoss(LogitAdjustedLoss):
    """Balanced softmax: CE on ``z_c + log n_c`` (logit adjustment with τ = 1).

    Ren, Yu, Ma, Zhao, Yi, Li, "Balanced Meta-Softmax for Long-Tailed Visual Recognition", NeurIPS 2020,
    arXiv:2007.10740. ``L = −log [ n_y e^{z_y} / Σ_c n_c e^{z_c} ]``. Equals ``ce`` for balanced classes.

    Args:
        class_counts: per-class training counts (required).
        num_classes: K (checks ``class_counts``).
        ignore_index / reduction: as in ``ce``.

    Raises:
        ValueError: missing or bad ``class_counts``.

    >>> z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    >>> torch.allclose(BalancedSoftmaxLoss(class_counts=[7, 7, 7])(z, y), F.cross_entropy(z, y))
    True

    YAML (``configs/loss/balanced_softmax.yaml``)::

        name: balanced_softmax
    """

    def __init__(
        self,
        class_counts: Sequence[float] | None = None,
        num_classes: int | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__(class_counts, num_classes, tau=1.0, ignore_index=ignore_index, reduction=reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


@register_loss("class_balanced")
class ClassBalancedLoss(FocalLoss):
    """Class-balanced loss: a base loss (``ce`` or softmax ``focal``) weighted by effective-number weights.

    Cui, Jia, Lin, Song, Belongie, "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019,
    arXiv:1901.05555. ``CB(z, y) = (1−β)/(1−β^{n_y}) · L(z, y)``, weights normalised to sum to K; the
    ``mean`` reduction is the weighted mean ``Σ w_{y_i} L_i / Σ w_{y_i}`` as for every weighted loss here.
    Same as ``focal`` with ``class_weights: effective_number`` (γ = 0 for ``base_loss: ce``).

    Args:
        class_counts: per-class training counts (required).
        num_classes: K (checks ``class_counts``).
        beta: β in ``[0, 1)``; default 0.9999.
        base_loss: ``focal`` (default) or ``ce``.
        gamma: focal γ ≥ 0 (ignored for ``ce``); default 2.0.
        ignore_index / reduction: as in ``ce``.

    Raises:
        ValueError: missing or bad ``class_counts``, β out of range, unknown ``base_loss``, γ < 0.

    >>> z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    >>> torch.allclose(ClassBalancedLoss(class_counts=[9, 9, 9], base_loss="ce")(z, y), F.cross_entropy(z, y))
    True

    YAML (``configs/loss/class_balanced.yaml``)::

        name: class_balanced
        beta: 0.9999
        base_loss: focal
        gamma: 2.0
    """

    def __init__(
        self,
        class_counts: Sequence[float] | None = None,
        num_classes: int | None = None,
        beta: float = 0.9999,
        base_loss: str = "focal",
        gamma: float = 2.0,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        base_loss = check_choice(self.name, "base_loss", base_loss, ("ce", "focal"))
        check_class_counts(self.name, class_counts, num_classes)
        gamma = check_number(self.name, "gamma", gamma, minimum=0.0)
        super().__init__(gamma=gamma if base_loss == "focal" else 0.0, class_weights="effective_number",
                         class_counts=class_counts, num_classes=num_classes, beta=beta,
                         ignore_index=ignore_index, reduction=reduction)
        self.base_loss = base_loss

    def extra_repr(self) -> str:
        return f"base_loss={self.base_loss!r}, gamma={self.gamma}, reduction={self.reduction!r}"


