"""Segmentation losses: ``dice``, ``dice_ce``, ``tversky``, ``focal_tversky``, ``focal_seg`` (MONAI
underneath), ``boundary`` and ``dice_boundary`` (Kervadec et al. 2019).

Shapes: ``logits (B, K, *spatial)`` float (softmax over K is applied inside), ``target (B, 1, *spatial)``
integer label map in ``[0, K)``; ``dist_maps (B, K, *spatial)`` float signed distance maps (boundary
losses only), computed once per case in the data pipeline with :func:`signed_distance_map`.

With ``sigmoid=True`` (overlapping regions, e.g. the BraTS whole tumour / tumour core / enhancing
tumour) each of the R channels is an independent sigmoid: ``logits (B, R, *spatial)``, ``target
(B, R, *spatial)`` multi-hot in {0, 1}, ``dist_maps (B, R, *spatial)`` one signed distance map per
region. There is no background channel then, so ``include_background`` is not used.

Reductions are over samples: each loss first computes one value per sample (the mean over classes,
and over voxels where the loss is voxel-wise), then ``mean``/``sum``/``none`` act on those ``(B,)``
values. ``mean`` therefore equals MONAI's ``mean`` reduction for the same loss.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import LossBase, check_bool, check_number, check_per_class
from .registry import register_loss

__all__ = [
    "DiceLoss",
    "DiceCELoss",
    "TverskyLoss",
    "FocalTverskyLoss",
    "FocalSegLoss",
    "BoundaryLoss",
    "DiceBoundaryLoss",
    "signed_distance_map",
    "boundary_loss",
]


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch one: ``(B, ...) -> (B,)``."""
    return values.reshape(values.shape[0], -1).mean(dim=1)


def _per_sample_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ a·b`` over every dimension but the batch one, ``(B, ...) -> (B,)``, without the product tensor:
    one BLAS dot per sample (B is small), half the time of ``torch.linalg.vecdot`` on CPU."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(a.shape[0], -1).to(a.dtype)
    return torch.stack([torch.dot(x, y) for x, y in zip(a, b)])


class _SegmentationLoss(LossBase):
    family = "segmentation"

    def _check_channels(self, include_background: bool, sigmoid: bool) -> dict[str, bool]:
        """Validate the channel flags, set ``self.sigmoid``; MONAI's channel arguments for them (with
        sigmoid channels there is no background channel to drop, and the target is already multi-hot)."""
        check_bool(self.name, "include_background", include_background)
        self.sigmoid = check_bool(self.name, "sigmoid", sigmoid)
        return {"include_background": include_background or sigmoid, "to_onehot_y": not sigmoid}

    def _overlap_args(self, include_background: bool, sigmoid: bool, smooth_nr: float,
                      smooth_dr: float) -> dict[str, bool | float]:
        """The validated arguments Dice and Tversky share, as MONAI's ``DiceLoss``/``TverskyLoss`` take them."""
        return self._check_channels(include_background, sigmoid) | {
            "softmax": not sigmoid, "sigmoid": sigmoid,
            "smooth_nr": check_number(self.name, "smooth_nr", smooth_nr, minimum=0.0),
            "smooth_dr": check_number(self.name, "smooth_dr", smooth_dr, minimum=0.0)}


# ------------------------------------------------------------------------------------------- dice
@register_loss("dice")
class DiceLoss(_SegmentationLoss):
    """Soft Dice loss over softmax probabilities (``monai.losses.DiceLoss`` underneath).

    Milletari, Navab, Ahmadi, "V-Net: Fully Convolutional Neural Networks for Volumetric Medical Image
    Segmentation", 3DV 2016, arXiv:1606.04797.
    Per sample and class ``c``: ``1 − (2 Σ p_c g_c + ε_nr) / (Σ p_c + Σ g_c + ε_dr)`` with ``p = softmax(z)``
    and ``g`` the one-hot label map (``p²``/``g²`` with ``squared_pred``); averaged over classes.

    Args:
        include_background: include class 0; default True.
        squared_pred: square the terms of the denominator; default False.
        smooth_nr: ε_nr ≥ 0, default 1e-5. smooth_dr: ε_dr ≥ 0, default 1e-5.
        num_classes: K (unused; accepted for the pipeline).
        sigmoid: independent sigmoid channels with a multi-hot target (see the module docstring);
            default False (softmax over a label map).
        reduction: ``mean`` | ``sum`` | ``none`` (over samples).

    Raises:
        ValueError: negative smoothing or bad ``reduction``. TypeError: non-bool flags.

    >>> z = torch.randn(2, 3, 4, 4); y = torch.randint(0, 3, (2, 1, 4, 4))
    >>> from monai.losses import DiceLoss as MonaiDiceLoss
    >>> torch.allclose(DiceLoss()(z, y), MonaiDiceLoss(to_onehot_y=True, softmax=True)(z, y))
    True

    YAML (``configs/loss/dice.yaml``)::

        name: dice
        include_background: true
    """

    def __init__(
        self,
        include_background: bool = True,
        squared_pred: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        num_classes: int | None = None,
        reduction: str = "mean",
        sigmoid: bool = False,
    ) -> None:
        super().__init__(reduction)
        check_bool(self.name, "squared_pred", squared_pred)
        from monai.losses import DiceLoss as MonaiDiceLoss  # here: importing MONAI takes seconds (every submodule)

        self.dice = MonaiDiceLoss(squared_pred=squared_pred, reduction="none",
                                  **self._overlap_args(include_background, sigmoid, smooth_nr, smooth_dr))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.reduce(_per_sample(self.dice(logits, target)))


@register_loss("dice_ce")
class DiceCELoss(DiceLoss):
    """``λ_dice · Dice + λ_ce · CE`` (the sum of ``dice`` and voxel-averaged cross-entropy).

    As ``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)``; per sample the CE is the mean over
    voxels of ``−log softmax(z)_y`` (with ``sigmoid=True``: the binary cross-entropy, mean over regions
    and voxels).

    Args:
        lambda_dice: ≥ 0, default 1. lambda_ce: ≥ 0, default 1.
        include_background / squared_pred / smooth_nr / smooth_dr / reduction: as ``dice``.

    Raises:
        ValueError: negative λ, negative smoothing or bad ``reduction``.

    >>> from monai.losses import DiceCELoss as M
    >>> z = torch.randn(2, 3, 4, 4); y = torch.randint(0, 3, (2, 1, 4, 4))
    >>> torch.allclose(DiceCELoss()(z, y), M(to_onehot_y=True, softmax=True)(z, y))
    True

    YAML (``configs/loss/dice_ce.yaml``)::

        name: dice_ce
        lambda_dice: 1.0
        lambda_ce: 1.0
    """

    def __init__(
        self,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        include_background: bool = True,
        squared_pred: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        num_classes: int | None = None,
        reduction: str = "mean",
        sigmoid: bool = False,
    ) -> None:
        super().__init__(include_background, squared_pred, smooth_nr, smooth_dr, num_classes, reduction, sigmoid)
        self.lambda_dice = check_number(self.name, "lambda_dice", lambda_dice, minimum=0.0)
        self.lambda_ce = check_number(self.name, "lambda_ce", lambda_ce, minimum=0.0)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dice = _per_sample(self.dice(logits, target))
        if self.sigmoid:  # binary cross-entropy per region channel
            ce = _per_sample(F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none"))
        else:
            ce = _per_sample(F.cross_entropy(logits, target[:, 0].long(), reduction="none"))
        return self.reduce(self.lambda_dice * dice + self.lambda_ce * ce)


# ---------------------------------------------------------------------------------------- tversky
@register_loss("tversky")
class TverskyLoss(_SegmentationLoss):
    """Tversky loss (``monai.losses.TverskyLoss`` underneath).

    Salehi, Erdogmus, Gholipour, "Tversky loss function for image segmentation using 3D fully
    convolutional deep networks", MLMI 2017, arXiv:1706.05721.
    Per class: ``1 − (TP + ε_nr) / (TP + α FP + β FN + ε_dr)`` with soft ``TP = Σ p g``,
    ``FP = Σ p (1 − g)``, ``FN = Σ (1 − p) g``; averaged over classes. α weighs false positives, β false
    negatives; α = β = 0.5 is Dice.

    Args:
        alpha: α ≥ 0, default 0.5. beta: β ≥ 0, default 0.5.
        include_background / smooth_nr / smooth_dr / reduction / sigmoid: as ``dice``.

    Raises:
        ValueError: negative α, β or smoothing; bad ``reduction``.

    >>> z = torch.randn(2, 3, 4, 4); y = torch.randint(0, 3, (2, 1, 4, 4))
    >>> torch.allclose(TverskyLoss(alpha=0.5, beta=0.5)(z, y), DiceLoss()(z, y), atol=1e-6)
    True

    YAML (``configs/loss/tversky.yaml``)::

        name: tversky
        alpha: 0.3
        beta: 0.7
    """

    def __init__(
        self,
        alpha: float = 0.5,
        beta: float = 0.5,
        include_background: bool = True,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        num_classes: int | None = None,
        reduction: str = "mean",
        sigmoid: bool = False,
    ) -> None:
        super().__init__(reduction)
        self.alpha = check_number(self.name, "alpha", alpha, minimum=0.0)
        self.beta = check_number(self.name, "beta", beta, minimum=0.0)
        from monai.losses import TverskyLoss as MonaiTverskyLoss

        self.tversky = MonaiTverskyLoss(alpha=self.alpha, beta=self.beta, reduction="none",
                                        **self._overlap_args(include_background, sigmoid, smooth_nr, smooth_dr))

    def per_class(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Tversky loss per sample and class ``(B, K')`` (K' = K, or K − 1 without background)."""
        return self.tversky(logits, target).reshape(logits.shape[0], -1)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.per_class(logits, target).mean(dim=1))


@register_loss("focal_tversky")
class FocalTverskyLoss(TverskyLoss):
    """Focal Tversky loss: ``mean_c (1 − TI_c)^γ`` (MONAI's Tversky underneath).

    Abraham, Khan, "A Novel Focal Tversky loss function with improved Attention U-Net for lesion
    segmentation", ISBI 2019, arXiv:1810.07842. The paper writes the exponent as ``1/γ`` with γ ∈ [1, 3]
    (best 4/3); here ``gamma`` *is* the exponent, default 0.75 (= 1/(4/3)). γ = 1 is ``tversky``.

    Args:
        gamma: exponent γ > 0, default 0.75.
        alpha: α ≥ 0 (false positives), default 0.3. beta: β ≥ 0 (false negatives), default 0.7.
        include_background / smooth_nr / smooth_dr / reduction / sigmoid: as ``dice``.

    Raises:
        ValueError: γ <= 0, negative α, β or smoothing; bad ``reduction``.

    >>> z = torch.randn(2, 3, 4, 4); y = torch.randint(0, 3, (2, 1, 4, 4))
    >>> torch.allclose(FocalTverskyLoss(gamma=1.0)(z, y), TverskyLoss(alpha=0.3, beta=0.7)(z, y))
    True

    YAML (``configs/loss/focal_tversky.yaml``)::

        name: focal_tversky
        alpha: 0.3
        beta: 0.7
        gamma: 0.75
    """

    def __init__(
        self,
        gamma: float = 0.75,
        alpha: float = 0.3,
        beta: float = 0.7,
        include_background: bool = True,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        num_classes: int | None = None,
        reduction: str = "mean",
        sigmoid: bool = False,
    ) -> None:
        super().__init__(alpha, beta, include_background, smooth_nr, smooth_dr, num_classes, reduction, sigmoid)
        self.gamma = check_number(self.name, "gamma", gamma, minimum=0.0, min_inclusive=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # clamp: 1 − TI can be a hair below 0 through the smoothing terms; x^γ with γ < 1 needs x ≥ 0
        return self.reduce(self.per_class(logits, target).clamp(min=0).pow(self.gamma).mean(dim=1))


# ------------------------------------------------------------------------------------------ focal
@register_loss("focal_seg")
class FocalSegLoss(_SegmentationLoss):
    """Voxel-wise softmax focal loss for segmentation (``monai.losses.FocalLoss(use_softmax=True)``).

    Lin, Goyal, Girshick, He, Dollár, "Focal Loss for Dense Object Detection", ICCV 2017,
    arXiv:1708.02002. Per voxel and class: ``−α_c (1 − p_c)^γ g_c log p_c``; with a scalar α MONAI uses
    ``1 − α`` for the background class 0 and α for the others. Per sample the value is the mean over
    classes and voxels, so ``mean`` equals MONAI's ``mean`` (which averages over B × K × voxels).

    Args:
        gamma: γ ≥ 0, default 2.0.
        alpha: None (default), a scalar in ``[0, 1]`` or a list of K values ≥ 0.
        class_weights: None or a list of K values ≥ 0 (MONAI's ``weight``).
        include_background: default True.
        num_classes: K (checks the list lengths).
        reduction: ``mean`` | ``sum`` | ``none`` (over samples).
        sigmoid: sigmoid focal loss per region channel with a multi-hot target (MONAI's
            ``use_softmax=False``: α weighs the positives, 1 − α the negatives); default False.

    Raises:
        ValueError: γ < 0, α out of range, lists of the wrong length; bad ``reduction``.

    >>> z = torch.randn(2, 3, 4, 4); y = torch.randint(0, 3, (2, 1, 4, 4))
    >>> from monai.losses import FocalLoss as MonaiFocalLoss
    >>> m = MonaiFocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0)
    >>> torch.allclose(FocalSegLoss()(z, y), m(z, y))
    True

    YAML (``configs/loss/focal_seg.yaml``)::

        name: focal_seg
        gamma: 2.0
        alpha: 0.25
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        class_weights: Sequence[float] | None = None,
        include_background: bool = True,
        num_classes: int | None = None,
        reduction: str = "mean",
        sigmoid: bool = False,
    ) -> None:
        super().__init__(reduction)
        self.gamma = check_number(self.name, "gamma", gamma, minimum=0.0)
        channels = self._check_channels(include_background, sigmoid)
        if alpha is not None:
            if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
                alpha = check_number(self.name, "alpha", alpha, minimum=0.0, maximum=1.0)
            else:
                alpha = check_per_class(self.name, "alpha", alpha, num_classes)
        if class_weights is not None:
            class_weights = check_per_class(self.name, "class_weights", class_weights, num_classes)
        self.alpha = alpha
        from monai.losses import FocalLoss as MonaiFocalLoss

        self.focal = MonaiFocalLoss(gamma=self.gamma, alpha=alpha, weight=class_weights, use_softmax=not sigmoid,
                                    reduction="none", **channels)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.sigmoid and not isinstance(self.alpha, list) and self.focal.class_weight is None:
            if target.shape != logits.shape:
                raise ValueError(f"loss {self.name!r}: target shape {tuple(target.shape)} differs from the "
                                 f"logits' {tuple(logits.shape)}")
            return self.reduce(sigmoid_focal_per_sample(logits.float(), target.float(), self.gamma, self.alpha))
        if self.sigmoid:
            target = target.to(logits.dtype)
        return self.reduce(_per_sample(self.focal(logits, target)))


def sigmoid_focal_per_sample(logits: torch.Tensor, target: torch.Tensor, gamma: float,
                             alpha: float | None) -> torch.Tensor:
    """Per-sample mean ``(B,)`` of MONAI's ``sigmoid_focal_loss`` (scalar or no α), in fewer passes.

    Written by hand because MONAI's formulation (two ``logsigmoid`` and an ``exp`` per voxel, a per-voxel
    α factor, a new tensor for every step) made the whole-volume ``val/loss`` of a compound loss cost
    ~15 % of sliding-window validation on CPU. Same algebra: ``BCE = softplus(z) − z t``,
    ``1 − p_t = sigmoid(z − 2 z t)`` (MONAI's ``exp(logsigmoid(−z(2t − 1)))``, soft targets included),
    and α, linear in ``t``, applied to the sums: ``Σ α_t f = (1 − α) Σ f + (2α − 1) Σ t f``. Steps run in
    place where autograd allows it (always, when no gradient is recorded). Agrees with MONAI to float
    rounding, values and gradients (``tests/test_segmentation.py``).
    """
    free = not (torch.is_grad_enabled() and logits.requires_grad)  # no graph: every step may run in place
    bce = F.softplus(logits).addcmul_(logits, target, value=-1)
    modulator = torch.addcmul(logits, logits, target, value=-2).sigmoid_()  # 1 − p_t
    modulator = modulator.pow_(gamma) if free else modulator.pow(gamma)
    focal = bce.mul_(modulator) if free else bce * modulator
    flat = focal.reshape(focal.shape[0], -1)
    if alpha is None:
        return flat.mean(dim=1)
    return ((1 - alpha) * flat.sum(dim=1) + (2 * alpha - 1) * _per_sample_dot(flat, target)) / flat.shape[1]


# --------------------------------------------------------------------------------------- boundary
def signed_distance_map(
    label_map: np.ndarray, num_classes: int, spacing: Sequence[float] | None = None
) -> np.ndarray:
    """Signed distance maps ``(K, *spatial)`` float32 of an integer label map ``(*spatial)``.

    For each class c with mask ``G`` (Kervadec et al.'s ``one_hot2dist``, with voxel spacing):
    ``φ_c = d(x, G) · 1[x ∉ G] − (d(x, ∁G) − h) · 1[x ∈ G]`` where ``d`` is the Euclidean distance
    (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``) to the nearest voxel of the
    set and ``h = min(spacing)``. So φ ≥ h > 0 outside and φ ≤ 0 inside, the inner boundary layer
    being 0. At unit spacing this is exactly the reference code (which subtracts 1 whatever the
    spacing, making some inside voxels positive when a spacing is below 1; ``h`` avoids that).
    A class absent from the map, or filling it, gets all zeros.
    Call it once per case in the data pipeline and pass the stacked maps as ``dist_maps``.

    Args:
        label_map: integer array ``(*spatial)`` (a leading channel axis of size 1 is removed when
            ``spacing`` has one entry fewer than ``label_map.ndim``).
        num_classes: K.
        spacing: voxel size per spatial axis (e.g. mm); default 1 everywhere.

    >>> signed_distance_map(np.array([0, 0, 1, 1, 1, 0]), 2)[1].tolist()
    [2.0, 1.0, 0.0, -1.0, 0.0, 1.0]
    """
    from scipy.ndimage import distance_transform_edt

    label_map = np.asarray(label_map)
    if spacing is not None and label_map.ndim == len(spacing) + 1 and label_map.shape[0] == 1:
        label_map = label_map[0]
    out = np.zeros((num_classes,) + label_map.shape, dtype=np.float32)
    offset = 1.0 if spacing is None else float(min(spacing))
    for c in range(num_classes):
        pos = label_map == c
        if not pos.any() or pos.all():
            continue
        neg = ~pos
        outside = distance_transform_edt(neg, sampling=spacing)  # distance of outside voxels to G
        inside = distance_transform_edt(pos, sampling=spacing)  # distance of inside voxels to the outside
        out[c] = outside * neg - (inside - offset) * pos
    return out


def boundary_loss(logits: torch.Tensor, dist_maps: torch.Tensor, include_background: bool = False,
                  sigmoid: bool = False) -> torch.Tensor:
    """Unreduced boundary loss ``(B,)``: mean over (classes, voxels) of ``softmax(z)_c · φ_c``
    (``sigmoid(z)_r · φ_r`` over every region channel with ``sigmoid=True``)."""
    probs = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=1)
    if not (sigmoid or include_background):
        probs, dist_maps = probs[:, 1:], dist_maps[:, 1:]
    return _per_sample_dot(probs, dist_maps) / probs[0].numel()


@register_loss("boundary")
class BoundaryLoss(_SegmentationLoss):
    """Boundary loss: probabilities weighted by the signed distance to the ground-truth boundary.

    Kervadec, Bouchtiba, Desrosiers, Granger, Dolz, Ben Ayed, "Boundary loss for highly unbalanced
    segmentation", MIDL 2019 / Medical Image Analysis 2021, arXiv:1812.07032.
    ``L_B = mean_{c, x} s_θ(x)_c · φ_c(x)`` with ``s = softmax(z)`` and ``φ_c`` the signed distance map of
    class c (:func:`signed_distance_map`, negative inside). It is minimal when the predicted region is
    the ground truth; usually combined with a regional loss (``dice_boundary``, or ``compound``).

    ``forward(logits (B, K, *spatial), target (B, 1, *spatial), dist_maps (B, K, *spatial))``;
    ``target`` is not used (kept so every segmentation loss has the same call).

    Args:
        include_background: include class 0; default False (the paper uses foreground classes only).
        num_classes: K (unused; accepted for the pipeline).
        reduction: ``mean`` | ``sum`` | ``none`` (over samples).
        sigmoid: region channels (``sigmoid(z)``, one distance map per region); default False.

    Raises:
        ValueError: bad ``reduction``. TypeError: non-bool ``include_background``.

    >>> phi = torch.tensor(signed_distance_map(np.array([[0, 1, 1, 0]]), 2))[None]
    >>> perfect = torch.tensor([[[[9.0, -9, -9, 9]], [[-9.0, 9, 9, -9]]]])
    >>> bool(BoundaryLoss()(perfect, None, phi) < BoundaryLoss()(-perfect, None, phi))
    True

    YAML (``configs/loss/boundary.yaml``)::

        name: boundary
        include_background: false
    """

    def __init__(self, include_background: bool = False, num_classes: int | None = None, reduction: str = "mean",
                 sigmoid: bool = False) -> None:
        super().__init__(reduction)
        self._check_channels(include_background, sigmoid)
        self.include_background = include_background

    def forward(self, logits: torch.Tensor, target: torch.Tensor | None, dist_maps: torch.Tensor) -> torch.Tensor:
        return self.reduce(boundary_loss(logits, dist_maps, self.include_background, self.sigmoid))


@register_loss("dice_boundary")
class DiceBoundaryLoss(_SegmentationLoss):
    """``α · Dice + (1 − α) · Boundary`` with α moved from Dice to the boundary term epoch by epoch.

    Kervadec et al. 2019 (see ``boundary``): α starts at ``alpha_start`` and decreases by ``alpha_step``
    per epoch down to ``alpha_min`` (``α_e = max(alpha_min, alpha_start − alpha_step · e)``, set by
    ``on_epoch_start(e)``). ``terms()`` gives ``dice`` and ``boundary``; ``weights()`` gives α and 1 − α.

    Args:
        alpha_start: in ``[0, 1]``, default 1.0. alpha_step: ≥ 0, default 0.01.
        alpha_min: in ``[0, alpha_start]``, default 0.01.
        include_background: for the Dice term, default True. boundary_include_background: default False.
        num_classes: K (unused). reduction: ``mean`` | ``sum`` | ``none``. sigmoid: as ``dice``.

    Raises:
        ValueError: α values out of range; bad ``reduction``.

    >>> loss = DiceBoundaryLoss(alpha_step=0.25, alpha_min=0.1)
    >>> loss.on_epoch_start(3); round(loss.alpha, 4)
    0.25
    >>> loss.on_epoch_start(10); round(loss.alpha, 4)
    0.1

    YAML (``configs/loss/dice_boundary.yaml``)::

        name: dice_boundary
        alpha_start: 1.0
        alpha_step: 0.01
        alpha_min: 0.01
    """

    def __init__(
        self,
        alpha_start: float = 1.0,
        alpha_step: float = 0.01,
        alpha_min: float = 0.01,
        include_background: bool = True,
        boundary_include_background: bool = False,
        num_classes: int | None = None,
        reduction: str = "mean",
        sigmoid: bool = False,
    ) -> None:
        super().__init__(reduction)
        self.alpha_start = check_number(self.name, "alpha_start", alpha_start, minimum=0.0, maximum=1.0)
        self.alpha_step = check_number(self.name, "alpha_step", alpha_step, minimum=0.0)
        self.alpha_min = check_number(self.name, "alpha_min", alpha_min, minimum=0.0, maximum=self.alpha_start)
        self.dice = DiceLoss(include_background=include_background, reduction="none", sigmoid=sigmoid)
        self.boundary = BoundaryLoss(include_background=boundary_include_background, reduction="none", sigmoid=sigmoid)
        self.alpha = self.alpha_start

    def on_epoch_start(self, epoch: int) -> None:
        """Set ``α = max(alpha_min, alpha_start − alpha_step · epoch)``."""
        self.alpha = max(self.alpha_min, self.alpha_start - self.alpha_step * epoch)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, dist_maps: torch.Tensor) -> torch.Tensor:
        dice = self.dice(logits, target)
        boundary = self.boundary(logits, target, dist_maps)
        self.record_terms(dice=dice, boundary=boundary)
        return self.reduce(self.alpha * dice + (1.0 - self.alpha) * boundary)

    def weights(self) -> dict[str, float]:
        return {"dice": float(self.alpha), "boundary": float(1.0 - self.alpha)}
