"""The multi-task objectives of image + text distillation (one head per task): the distillation
losses of :mod:`losslab.losses.distillation` summed over the tasks, plus the labelled cross-entropy.

``L = ce_weight · Σ_t CE(s_t, y_t) + distill_weight · D``: a case whose label the student may not
see carries :data:`UNLABELLED` and only adds to D. :class:`LabelsOnly` is ``Σ_t CE`` (the teacher and
the student alone). Both are called as ``objective(student_logits {t: (B, K_t)}, teacher_logits,
labels {t: (B,)}, student_features (B, D_s), teacher_features (B, D_t), index (B,))``; the multitask
task (:class:`losslab.tasks.MultitaskTask`) looks up the teacher's outputs and applies the labelled mask.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from losslab.schema import DISTILL_LOSSES  # the names distill.losses accepts (vanilla is kd)

from .base import TermRecorder

__all__ = ["DISTILL_LOSSES", "LabelsOnly", "MultiTaskDistillation", "UNLABELLED", "labelled_cross_entropy",
           "labelled_subset"]

_PER_TASK = ("kd", "combined")

UNLABELLED = -100  # a label the students do not see (``F.cross_entropy``'s ignore_index)


def labelled_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean CE over the cases whose target is not :data:`UNLABELLED`; ``0`` when a batch has none."""
    labelled = target != UNLABELLED
    if not bool(labelled.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[labelled], target[labelled])


def labelled_subset(labels: Sequence, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask ``(N,)``: ``round(fraction · n_c)`` cases of each class ``c`` of ``labels``
    (at least one), drawn with ``seed``; all ``True`` for ``fraction = 1``."""
    labels = np.asarray(labels)
    mask = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng(seed)
    for value in pd.unique(labels):
        members = np.flatnonzero(labels == value)
        keep = max(1, int(round(fraction * len(members))))
        mask[rng.choice(members, size=keep, replace=False)] = True
    return mask

class MultiTaskDistillation(TermRecorder):
    """``L = ce_weight · Σ_t CE(s_t, y_t) + distill_weight · D`` with D from the loss library.

    Args:
        name: one of :data:`DISTILL_LOSSES` (see the module docstring for D).
        params: the loss's own parameters (``temperature``, ``hint_weight``, ``mode``, ...); ``alpha``
            (kd/combined) and the loss's own ``ce_weight`` are set here and may not be given.
        tasks: task names, in head order.
        student_dim / teacher_dim: fused feature sizes ``D_s``, ``D_t``.
        num_data: training-set size (``crd`` memory bank).
        ce_weight, distill_weight: ≥ 0.

    ``forward(student_logits {t: (B, K_t)}, teacher_logits {t: (B, K_t)}, labels {t: (B,)},
    student_features (B, D_s), teacher_features (B, D_t), index (B,)) -> scalar``; :meth:`terms`
    returns the last unweighted terms (``ce/<task>``, ``kd/<task>``, ``hint``, ``crd``, ...).

    Raises:
        ValueError: unknown name, a reserved parameter, a negative weight.
    """

    def __init__(self, name: str, params: dict[str, Any], tasks: Sequence[str], student_dim: int, teacher_dim: int,
                 num_data: int | None = None, ce_weight: float = 1.0, distill_weight: float = 1.0) -> None:
        super().__init__()
        from losslab.losses import build_loss
        from losslab.losses.registry import accepted_params, get_loss_class

        if name not in DISTILL_LOSSES:
            raise ValueError(f"distill loss {name!r} is not supported; expected one of {', '.join(DISTILL_LOSSES)}")
        for what, value in (("ce_weight", ce_weight), ("distill_weight", distill_weight)):
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"distill loss {name!r}: {what} must be a number >= 0, got {value!r}")
        self.name = name
        self.registry_name = "kd" if name == "vanilla" else name
        self.tasks = list(tasks)
        self.ce_weight = float(ce_weight)
        self.distill_weight = float(distill_weight)
        params = dict(params)
        reserved = "alpha" if self.registry_name in _PER_TASK else "ce_weight"
        if reserved in params:
            raise ValueError(f"distill loss {name!r}: {reserved!r} is set by the distill pipeline; weight the terms "
                             f"with distill.ce_weight and distill.distill_weight (or per loss) instead")
        names, _ = accepted_params(get_loss_class(self.registry_name))
        auto = {"student_dim": student_dim, "teacher_dim": teacher_dim}
        if self.registry_name == "crd" and params.get("mode") == "memory_bank":
            auto["num_data"] = num_data
        params = {k: v for k, v in auto.items() if k in names and k not in params} | params
        if self.registry_name in _PER_TASK:
            losses = {}
            for i, task in enumerate(self.tasks):
                task_params = dict(params, alpha=1.0)
                if self.registry_name == "combined" and i > 0:
                    task_params["hint_weight"] = 0.0  # one hint on the shared fused features
                losses[task] = build_loss(self.registry_name, **task_params)
            self.losses = nn.ModuleDict(losses)
        else:
            self.losses = nn.ModuleDict({"features": build_loss(self.registry_name, **params, ce_weight=0.0)})

    def forward(self, student_logits, teacher_logits, labels, student_features, teacher_features, index=None):
        terms: dict[str, torch.Tensor] = {}
        ce = student_features.new_zeros(())
        for task in self.tasks:
            ce_t = labelled_cross_entropy(student_logits[task].float(), labels[task])
            terms[f"ce/{task}"] = ce_t
            ce = ce + ce_t
        distill = student_features.new_zeros(())
        if self.registry_name in _PER_TASK:
            for task in self.tasks:
                loss = self.losses[task]
                distill = distill + loss(student_logits[task].float(), teacher_logits[task].float(), labels[task],
                                         student_features.float(), teacher_features.float(), index)
                for k, v in loss.term_tensors().items():
                    if k != "ce":
                        terms[k if k == "hint" else f"{k}/{task}"] = v
        else:
            first = self.tasks[0]
            loss = self.losses["features"]
            distill = loss(student_logits[first].float(), teacher_logits[first].float(), labels[first],
                           student_features.float(), teacher_features.float(), index)
            terms.update({k: v for k, v in loss.term_tensors().items() if k != "ce"})
        self.record_terms(**terms)
        return self.ce_weight * ce + self.distill_weight * distill


class LabelsOnly(TermRecorder):
    """``Σ_t CE(s_t, y_t)`` (teacher and student alone)."""

    def __init__(self, tasks: Sequence[str], ce_weight: float = 1.0) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.ce_weight = float(ce_weight)

    def forward(self, student_logits, teacher_logits, labels, student_features, teacher_features, index=None):
        total = student_features.new_zeros(())
        terms = {}
        for task in self.tasks:
            ce = F.cross_entropy(student_logits[task].float(), labels[task])
            terms[f"ce/{task}"] = ce
            total = total + ce
        self.record_terms(**terms)
        return self.ce_weight * total
