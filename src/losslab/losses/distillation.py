"""Knowledge-distillation losses: ``kd``, ``combined``, ``rkd``, ``crd``, ``mmd`` (``family = "distillation"``).

Every distillation loss here has the same call::

    loss(student_logits,            # (B, K) float, the student's head output
         teacher_logits,            # (B, K) float, the (frozen) teacher's head output; detached inside
         target,                    # (B,) long class labels
         student_features=None,     # (B, Ds) float, the student's pooled features (before the head)
         teacher_features=None,     # (B, Dt) float, the teacher's pooled features; detached inside
         index=None)                # (B,) long dataset indices of the samples (crd memory-bank mode only)

Losses that compare features need ``student_features``/``teacher_features``; those that learn a
projection or embedding take ``student_dim`` (Ds) and ``teacher_dim`` (Dt) in the constructor (the
projection's parameters are ordinary ``nn.Parameter``s and go to the optimizer with
``loss.parameters()``). Each loss includes the task cross-entropy on ``target`` (``ce_weight``, or
``1 − alpha`` for ``kd``/``combined``) so that it can train a student on its own; set it to 0 for the pure
distillation term. ``terms()`` returns each term's last value (unweighted) for logging.
Reductions act on per-sample values ``(B,)``; for the batch-relational losses (``rkd``, ``crd``
in-batch, ``mmd``) the per-sample value is sample i's share (its row of the relation matrix), so
``mean`` equals the usual batch formula.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import LossBase, check_choice, check_number
from .registry import register_loss

__all__ = [
    "KDLoss",
    "CombinedDistillationLoss",
    "RKDLoss",
    "CRDLoss",
    "MMDLoss",
    "kd_loss",
    "rkd_distance_loss",
    "rkd_angle_loss",
    "mmd_loss",
]


class _DistillationLoss(LossBase):
    family = "distillation"

    def _dims(self, student_dim, teacher_dim, required: bool, why: str) -> tuple[int | None, int | None]:
        if required and (student_dim is None or teacher_dim is None):
            missing = "student_dim" if student_dim is None else "teacher_dim"
            raise ValueError(f"loss {self.name!r}: {missing} is required ({why}); got None")
        s = None if student_dim is None else check_number(self.name, "student_dim", student_dim, minimum=1, integer=True)
        t = None if teacher_dim is None else check_number(self.name, "teacher_dim", teacher_dim, minimum=1, integer=True)
        return s, t


def _ce(student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(student_logits, target, reduction="none")


# --------------------------------------------------------------------------------------------- kd
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Unreduced ``T² KL(σ(t/T) ‖ σ(s/T))`` per sample ``(B,)`` (``Σ_c p_t,c (log p_t,c − log p_s,c)``)."""
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(dim=1) * temperature**2


@register_loss("kd")
class KDLoss(_DistillationLoss):
    """Hinton knowledge distillation: ``α T² KL(σ(t/T) ‖ σ(s/T)) + (1 − α) CE(s, y)``.

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep Learning
    Workshop, arXiv:1503.02531. ``σ`` is the softmax, ``s``/``t`` the student/teacher logits, T the
    temperature; the T² factor keeps gradient magnitudes comparable across temperatures. With
    ``alpha = 1`` the CE term is skipped (``target`` may be None). ``terms()``: ``kd`` (``T² KL``), ``ce``.

    Args:
        alpha: α in ``[0, 1]``, default 0.9.
        temperature: T > 0, default 4.0.
        num_classes: K (unused). reduction: ``mean`` | ``sum`` | ``none``.

    Raises:
        ValueError: α or T out of range; bad ``reduction``.

    >>> s, t = torch.randn(4, 3), torch.randn(4, 3)
    >>> ref = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4
    >>> torch.allclose(KDLoss(alpha=1.0, temperature=2.0)(s, t, None), ref)
    True

    YAML (``configs/loss/kd.yaml``)::

        name: kd
        alpha: 0.9
        temperature: 4.0
    """

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0, num_classes: int | None = None,
                 reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.alpha = check_number(self.name, "alpha", alpha, minimum=0.0, maximum=1.0)
        self.temperature = check_number(self.name, "temperature", temperature, minimum=0.0, min_inclusive=False)

    def forward(self, student_logits, teacher_logits, target, student_features=None, teacher_features=None,
                index=None) -> torch.Tensor:
        if self.alpha == 1.0 and self.reduction == "mean":  # fast path: one fused batchmean KL
            T = self.temperature
            kd = F.kl_div(F.log_softmax(student_logits / T, dim=1), F.log_softmax(teacher_logits.detach() / T, dim=1),
                          reduction="batchmean", log_target=True) * T**2
            self.record_terms(kd=kd)
            return kd
        kd = kd_loss(student_logits, teacher_logits, self.temperature)
        if self.alpha == 1.0:
            self.record_terms(kd=kd)
            return self.reduce(kd)
        ce = _ce(student_logits, target)
        self.record_terms(kd=kd, ce=ce)
        return self.reduce(self.alpha * kd + (1.0 - self.alpha) * ce)


@register_loss("combined")
class CombinedDistillationLoss(_DistillationLoss):
    """CE + KD + a FitNets-style feature hint through a learned projection.

    ``L = (1 − α) CE(s, y) + α T² KL(σ(t/T) ‖ σ(s/T)) + λ · mean_d (W f_s + b − f_t)_d²``

    * CE and KD exactly as ``kd`` (Hinton et al. 2015, arXiv:1503.02531);
    * the hint term (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015, arXiv:1412.6550) is
      the mean squared error between the student's pooled features projected by a learned
      ``nn.Linear(student_dim, teacher_dim)`` and the (detached) teacher features.

    ``terms()``: ``ce``, ``kd`` (``T² KL``), ``hint`` (the MSE, unweighted).

    Args:
        student_dim: Ds (required when ``hint_weight > 0``). teacher_dim: Dt (idem).
        alpha: α in ``[0, 1]``, default 0.9. temperature: T > 0, default 4.0.
        hint_weight: λ ≥ 0, default 1.0.
        num_classes: K (unused). reduction: ``mean`` | ``sum`` | ``none``.

    Raises:
        ValueError: missing dims, α/T/λ out of range; bad ``reduction``.

    >>> loss = CombinedDistillationLoss(student_dim=8, teacher_dim=16)
    >>> s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    >>> sorted(loss(s, t, y, torch.randn(4, 8), torch.randn(4, 16)) and loss.terms())
    ['ce', 'hint', 'kd']

    YAML (``configs/loss/combined.yaml``)::

        name: combined
        alpha: 0.9
        temperature: 4.0
        hint_weight: 1.0
        student_dim: 512
        teacher_dim: 512
    """

    def __init__(self, student_dim: int | None = None, teacher_dim: int | None = None, alpha: float = 0.9,
                 temperature: float = 4.0, hint_weight: float = 1.0, num_classes: int | None = None,
                 reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.alpha = check_number(self.name, "alpha", alpha, minimum=0.0, maximum=1.0)
        self.temperature = check_number(self.name, "temperature", temperature, minimum=0.0, min_inclusive=False)
        self.hint_weight = check_number(self.name, "hint_weight", hint_weight, minimum=0.0)
        s, t = self._dims(student_dim, teacher_dim, self.hint_weight > 0, "the hint projection maps Ds -> Dt")
        self.projection = nn.Linear(s, t) if self.hint_weight > 0 else None

    def forward(self, student_logits, teacher_logits, target, student_features=None, teacher_features=None,
                index=None) -> torch.Tensor:
        kd = kd_loss(student_logits, teacher_logits, self.temperature)
        ce = _ce(student_logits, target)
        total = self.alpha * kd + (1.0 - self.alpha) * ce
        if self.projection is None:
            self.record_terms(ce=ce, kd=kd)
            return self.reduce(total)
        hint = (self.projection(student_features) - teacher_features.detach()).pow(2).mean(dim=1)
        self.record_terms(ce=ce, kd=kd, hint=hint)
        return self.reduce(total + self.hint_weight * hint)


# -------------------------------------------------------------------------------------------- rkd
def _pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    # ‖e_i − e_j‖ = sqrt(‖e_i‖² + ‖e_j‖² − 2 e_i·e_j), clamped for a finite gradient; diagonal set to 0
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def _normalised_distances(e: torch.Tensor) -> torch.Tensor:
    d = _pairwise_distances(e)
    return d / d[d > 0].mean()


def _angles(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``a[i, j, k] = cos∠ e_j e_i e_k`` (angle at vertex i), 0 where j = i or k = i.

    Computed from the Gram matrix ``G = e eᵀ`` instead of the ``(B, B, D)`` difference tensor of the
    reference code (same values, O(B³ + B² D) instead of O(B³ D)):
    ``⟨e_j − e_i, e_k − e_i⟩ = G_jk − G_ij − G_ik + G_ii`` divided by ``‖e_j − e_i‖ ‖e_k − e_i‖``.
    """
    gram = e @ e.t()
    diag = gram.diagonal()
    # inner[i, j, k] = G_jk − G_ij − G_ik + G_ii
    inner = gram.unsqueeze(0) - gram.unsqueeze(2) - gram.unsqueeze(1) + diag.view(-1, 1, 1)
    off = 1 - torch.eye(len(e), device=e.device, dtype=e.dtype)
    # inv[i, j] = 1 / ‖e_j − e_i‖, and 0 on the diagonal (which zeroes the j = i and k = i entries)
    inv = off / (diag.unsqueeze(1) + diag.unsqueeze(0) - 2 * gram).clamp(min=0).sqrt().clamp(min=eps)
    return (inner * inv.unsqueeze(2) * inv.unsqueeze(1)).clamp(-1.0, 1.0)


def rkd_distance_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Per-sample RKD distance loss ``(B,)``: ``mean_j Huber(d_s(i, j)/μ_s, d_t(i, j)/μ_t)``."""
    with torch.no_grad():
        t = _normalised_distances(teacher_features)
    s = _normalised_distances(student_features)
    return F.smooth_l1_loss(s, t, reduction="none").mean(dim=1)


def rkd_angle_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Per-sample RKD angle loss ``(B,)``: ``mean_{j,k} Huber(cos∠_s(j, i, k), cos∠_t(j, i, k))``."""
    with torch.no_grad():
        t = _angles(teacher_features)
    s = _angles(student_features)
    return F.smooth_l1_loss(s, t, reduction="none").mean(dim=(1, 2))


@register_loss("rkd")
class RKDLoss(_DistillationLoss):
    """Relational knowledge distillation: distance-wise and angle-wise relations of a feature batch.

    Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019, arXiv:1904.05068.
    ``L = ce_weight · CE + λ_D · mean_{i,j} ℓ_δ(ψ_D^s(i,j), ψ_D^t(i,j)) + λ_A · mean_{i,j,k} ℓ_δ(ψ_A^s, ψ_A^t)``
    with ``ψ_D(i, j) = ‖f_i − f_j‖ / μ`` (μ the mean non-zero distance in the batch),
    ``ψ_A(i, j, k) = cos∠ f_j f_i f_k``, ``ℓ_δ`` the Huber (smooth L1) loss; λ_D = 25, λ_A = 50 as in the
    paper's code. Student and teacher feature sizes may differ (no projection needed).
    ``terms()``: ``ce``, ``rkd_distance``, ``rkd_angle`` (unweighted).

    Args:
        distance_weight: λ_D ≥ 0, default 25. angle_weight: λ_A ≥ 0, default 50.
        ce_weight: ≥ 0, default 1.0.
        num_classes: K (unused). reduction: ``mean`` | ``sum`` | ``none``.

    Raises:
        ValueError: negative weights; bad ``reduction``.

    >>> f = torch.randn(5, 8)
    >>> float(RKDLoss(ce_weight=0.0)(torch.randn(5, 3), torch.randn(5, 3), None, 2 * f, f))  # scale-free
    0.0

    YAML (``configs/loss/rkd.yaml``)::

        name: rkd
        distance_weight: 25.0
        angle_weight: 50.0
        ce_weight: 1.0
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, ce_weight: float = 1.0,
                 num_classes: int | None = None, reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.distance_weight = check_number(self.name, "distance_weight", distance_weight, minimum=0.0)
        self.angle_weight = check_number(self.name, "angle_weight", angle_weight, minimum=0.0)
        self.ce_weight = check_number(self.name, "ce_weight", ce_weight, minimum=0.0)

    def forward(self, student_logits, teacher_logits, target, student_features=None, teacher_features=None,
                index=None) -> torch.Tensor:
        dist = rkd_distance_loss(student_features, teacher_features.detach())
        angle = rkd_angle_loss(student_features, teacher_features.detach())
        total = self.distance_weight * dist + self.angle_weight * angle
        if self.ce_weight > 0:
            ce = _ce(student_logits, target)
            self.record_terms(ce=ce, rkd_distance=dist, rkd_angle=angle)
            total = total + self.ce_weight * ce
        else:
            self.record_terms(rkd_distance=dist, rkd_angle=angle)
        return self.reduce(total)


# -------------------------------------------------------------------------------------------- crd
@register_loss("crd")
class CRDLoss(_DistillationLoss):
    """Contrastive representation distillation (softmax / InfoNCE form).

    Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699.
    Student and teacher features go through learned embedding heads (``Linear`` to ``embed_dim`` = 128,
    then L2 normalisation) giving ``e_s``, ``e_t``. With temperature τ (0.07):

    * ``mode="memory_bank"`` (the paper's): momentum memory banks ``M_s``, ``M_t`` ``(num_data, embed_dim)``;
      for sample i with dataset index ``n_i``, the positive for ``e_s,i`` is ``M_t[n_i]`` and the
      ``num_negatives`` negatives are ``M_t`` rows drawn uniformly at random (and symmetrically for
      ``e_t,i`` against ``M_s``); ``l_i = −log softmax([e·pos, e·neg_1, …]/τ)_0`` summed over both
      directions. After the forward (in training mode) ``M[n_i] ← normalise(m M[n_i] + (1 − m) e_i)``
      with momentum m = 0.5. Needs ``num_data`` and the forward kwarg ``index (B,)``. The memory update
      is the one piece of state this package changes in a forward: it is the method.
    * ``mode="in_batch"`` (for small data; no bank): the other samples of the batch are the negatives,
      ``l_i = −log softmax(e_s,i · E_t^T / τ)_i − log softmax(e_t,i · E_s^T / τ)_i``.

    The paper's NCE objective with an estimated partition constant is replaced by this softmax form
    (its "CRD-softmax" variant), which keeps no estimate between batches.
    ``L = ce_weight · CE + crd_weight · l``. ``terms()``: ``ce``, ``crd``.

    Args:
        student_dim: Ds (required). teacher_dim: Dt (required).
        embed_dim: default 128. temperature: τ > 0, default 0.07.
        mode: ``in_batch`` (default) | ``memory_bank``.
        num_data: dataset size (required for ``memory_bank``).
        num_negatives: negatives per anchor in ``memory_bank`` mode, ≥ 1, default 4096.
        momentum: memory momentum in ``[0, 1)``, default 0.5.
        crd_weight: ≥ 0, default 0.8 (the paper's β). ce_weight: ≥ 0, default 1.0.
        num_classes: K (unused). reduction: ``mean`` | ``sum`` | ``none``.

    Raises:
        ValueError: missing dims or ``num_data``, values out of range, unknown mode; bad ``reduction``.

    >>> loss = CRDLoss(student_dim=8, teacher_dim=16, ce_weight=0.0)
    >>> bool(loss(torch.randn(4, 3), torch.randn(4, 3), None, torch.randn(4, 8), torch.randn(4, 16)) > 0)
    True

    YAML (``configs/loss/crd.yaml``)::

        name: crd
        student_dim: 512
        teacher_dim: 512
        mode: in_batch          # or memory_bank with num_data: <training set size>
        num_negatives: 4096
        temperature: 0.07
    """

    def __init__(self, student_dim: int | None = None, teacher_dim: int | None = None, embed_dim: int = 128,
                 temperature: float = 0.07, mode: str = "in_batch", num_data: int | None = None,
                 num_negatives: int = 4096, momentum: float = 0.5, crd_weight: float = 0.8,
                 ce_weight: float = 1.0, num_classes: int | None = None, reduction: str = "mean") -> None:
        super().__init__(reduction)
        s, t = self._dims(student_dim, teacher_dim, True, "CRD learns embedding heads Ds -> embed_dim, Dt -> embed_dim")
        self.embed_dim = check_number(self.name, "embed_dim", embed_dim, minimum=1, integer=True)
        self.temperature = check_number(self.name, "temperature", temperature, minimum=0.0, min_inclusive=False)
        self.mode = check_choice(self.name, "mode", mode, ("in_batch", "memory_bank"))
        self.num_negatives = check_number(self.name, "num_negatives", num_negatives, minimum=1, integer=True)
        self.momentum = check_number(self.name, "momentum", momentum, minimum=0.0, maximum=1.0, max_inclusive=False)
        self.crd_weight = check_number(self.name, "crd_weight", crd_weight, minimum=0.0)
        self.ce_weight = check_number(self.name, "ce_weight", ce_weight, minimum=0.0)
        self.embed_student = nn.Linear(s, self.embed_dim)
        self.embed_teacher = nn.Linear(t, self.embed_dim)
        if self.mode == "memory_bank":
            if num_data is None:
                raise ValueError(f"loss {self.name!r}: num_data is required for mode='memory_bank' (the number "
                                 f"of training samples, the size of the memory bank); got None")
            self.num_data = check_number(self.name, "num_data", num_data, minimum=2, integer=True)
            stdv = 1.0 / math.sqrt(self.embed_dim / 3)
            self.register_buffer("memory_student", F.normalize(torch.rand(self.num_data, self.embed_dim) * 2 * stdv - stdv, dim=1))
            self.register_buffer("memory_teacher", F.normalize(torch.rand(self.num_data, self.embed_dim) * 2 * stdv - stdv, dim=1))
        else:
            self.num_data = num_data

    def embed(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised embeddings ``(B, embed_dim)`` of student and (detached) teacher features."""
        e_s = F.normalize(self.embed_student(student_features), dim=1)
        e_t = F.normalize(self.embed_teacher(teacher_features.detach()), dim=1)
        return e_s, e_t

    def _bank_nce(self, anchor: torch.Tensor, memory: torch.Tensor, index: torch.Tensor,
                  negatives: torch.Tensor) -> torch.Tensor:
        candidates = torch.cat([index.unsqueeze(1), negatives], dim=1)  # (B, 1 + N), positive first
        if candidates.numel() >= memory.shape[0]:
            # cheaper to score the whole bank with one matmul, then pick the candidates
            logits = (anchor @ memory.t().to(anchor.dtype)).gather(1, candidates) / self.temperature
        else:
            weights = memory[candidates].to(anchor.dtype)  # (B, 1 + N, E)
            logits = torch.bmm(weights, anchor.unsqueeze(2)).squeeze(2) / self.temperature
        return -F.log_softmax(logits, dim=1)[:, 0]

    def forward(self, student_logits, teacher_logits, target, student_features=None, teacher_features=None,
                index=None) -> torch.Tensor:
        e_s, e_t = self.embed(student_features, teacher_features)
        if self.mode == "in_batch":
            logits = e_s @ e_t.t() / self.temperature
            labels = torch.arange(len(e_s), device=e_s.device)
            crd = F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(logits.t(), labels, reduction="none")
        else:
            if index is None:
                raise ValueError(f"loss {self.name!r}: mode='memory_bank' needs the forward kwarg index (B,) "
                                 f"of dataset indices")
            index = index.long()
            negatives = torch.randint(0, self.num_data, (len(index), self.num_negatives), device=index.device)
            crd = self._bank_nce(e_s, self.memory_teacher, index, negatives) \
                + self._bank_nce(e_t, self.memory_student, index, negatives)
            if self.training:
                # out of place: the scores above may have saved the old bank for the backward pass
                with torch.no_grad():
                    for name, e in (("memory_student", e_s), ("memory_teacher", e_t)):
                        memory = getattr(self, name)
                        updated = memory[index] * self.momentum + e.detach().to(memory.dtype) * (1 - self.momentum)
                        setattr(self, name, memory.index_copy(0, index, F.normalize(updated, dim=1)))
        total = self.crd_weight * crd
        if self.ce_weight > 0:
            ce = _ce(student_logits, target)
            self.record_terms(ce=ce, crd=crd)
            total = total + self.ce_weight * ce
        else:
            self.record_terms(crd=crd)
        return self.reduce(total)


# -------------------------------------------------------------------------------------------- mmd
def mmd_loss(x: torch.Tensor, y: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5) -> torch.Tensor:
    """Per-sample shares ``(B,)`` of the biased multi-bandwidth Gaussian-kernel MMD² between ``x`` and ``y``.

    ``k(a, b) = Σ_{q=0}^{Q−1} exp(−‖a − b‖² / (σ² · mul^{q − ⌊Q/2⌋}))`` with the base bandwidth σ² the
    mean squared distance between distinct points of the joint batch (not differentiated through).
    ``r_i = mean_j k(x_i, x_j) + mean_j k(y_i, y_j) − mean_j k(x_i, y_j) − mean_j k(y_i, x_j)``, so
    ``mean_i r_i = MMD²(x, y) = E k(x, x') + E k(y, y') − 2 E k(x, y)``.
    """
    n = len(x)
    z = torch.cat([x, y], dim=0)
    d2 = torch.cdist(z, z).pow(2)
    base = d2.detach().sum() / (4 * n * n - 2 * n)
    base = base.clamp(min=1e-12)
    kernel = sum(torch.exp(-d2 / (base * kernel_mul ** (q - kernel_num // 2))) for q in range(kernel_num))
    kxx, kyy, kxy, kyx = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:], kernel[n:, :n]
    return kxx.mean(1) + kyy.mean(1) - kxy.mean(1) - kyx.mean(1)


@register_loss("mmd")
class MMDLoss(_DistillationLoss):
    """Maximum mean discrepancy between student and teacher feature batches (multi-bandwidth Gaussian kernel).

    Gretton, Borgwardt, Rasch, Schölkopf, Smola, "A Kernel Two-Sample Test", JMLR 2012; multi-kernel
    form as in Long et al., "Learning Transferable Features with Deep Adaptation Networks", ICML 2015,
    arXiv:1502.02791. See :func:`mmd_loss` for the kernel and the bandwidths. When ``student_dim`` and
    ``teacher_dim`` are both given and differ, the student features go through a learned
    ``nn.Linear(student_dim, teacher_dim)`` first; otherwise the features must have the same size.
    ``L = ce_weight · CE + mmd_weight · MMD²``. ``terms()``: ``ce``, ``mmd``.

    Args:
        student_dim / teacher_dim: feature sizes (optional; see above).
        kernel_mul: bandwidth ratio > 0, default 2.0. kernel_num: number of bandwidths ≥ 1, default 5.
        mmd_weight: ≥ 0, default 1.0. ce_weight: ≥ 0, default 1.0.
        num_classes: K (unused). reduction: ``mean`` | ``sum`` | ``none``.

    Raises:
        ValueError: values out of range; bad ``reduction``.

    >>> f = torch.randn(6, 4)
    >>> abs(float(MMDLoss(ce_weight=0.0)(torch.randn(6, 3), torch.randn(6, 3), None, f, f))) < 1e-6
    True

    YAML (``configs/loss/mmd.yaml``)::

        name: mmd
        kernel_mul: 2.0
        kernel_num: 5
        mmd_weight: 1.0
    """

    def __init__(self, student_dim: int | None = None, teacher_dim: int | None = None, kernel_mul: float = 2.0,
                 kernel_num: int = 5, mmd_weight: float = 1.0, ce_weight: float = 1.0,
                 num_classes: int | None = None, reduction: str = "mean") -> None:
        super().__init__(reduction)
        s, t = self._dims(student_dim, teacher_dim, False, "")
        self.kernel_mul = check_number(self.name, "kernel_mul", kernel_mul, minimum=0.0, min_inclusive=False)
        self.kernel_num = check_number(self.name, "kernel_num", kernel_num, minimum=1, integer=True)
        self.mmd_weight = check_number(self.name, "mmd_weight", mmd_weight, minimum=0.0)
        self.ce_weight = check_number(self.name, "ce_weight", ce_weight, minimum=0.0)
        self.projection = nn.Linear(s, t) if s is not None and t is not None and s != t else None

    def forward(self, student_logits, teacher_logits, target, student_features=None, teacher_features=None,
                index=None) -> torch.Tensor:
        f_s = self.projection(student_features) if self.projection is not None else student_features
        mmd = mmd_loss(f_s, teacher_features.detach().to(f_s.dtype), self.kernel_mul, self.kernel_num)
        total = self.mmd_weight * mmd
        if self.ce_weight > 0:
            ce = _ce(student_logits, target)
            self.record_terms(ce=ce, mmd=mmd)
            total = total + self.ce_weight * ce
        else:
            self.record_terms(mmd=mmd)
        return self.reduce(total)
