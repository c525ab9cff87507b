"""``LossBase``: the interface every registered loss implements, plus shared validation helpers.

The train pipeline relies on exactly this interface:

* ``family`` (class attribute): the kind of target the loss is for, ``"classification"``, ``"ordinal"``,
  ``"segmentation"`` or ``"distillation"`` (a task, :mod:`losslab.tasks`, says which families it trains).
* ``reduction``: ``"mean"`` (mean over samples, never over samples x classes), ``"sum"`` or ``"none"``
  (one value per sample, shape ``(B,)``).
* ``on_epoch_start(epoch)``: called by the engine at the start of every epoch (0-based); no-op here.
* ``output_dim(num_classes)``: the size of the model head this loss expects (K by default).
* ``probabilities(logits) -> (B, K)`` and ``predict(logits) -> (B,)`` turn head outputs into
  class probabilities and labels (softmax / argmax by default).
* ``terms()`` / ``term_tensors()``: per-term values of the last forward (``train/loss_<term>``), empty
  by default; a composite loss records them with :meth:`TermRecorder.record_terms`, the one place
  that keeps them.
* ``weights()``: current term weights (``loss_weight/<term>``), empty by default.

Learnable loss parameters are ordinary ``nn.Parameter``s; the pipeline adds ``loss.parameters()``
to the optimizer.
"""

from __future__ import annotations

import math
import numbers
import warnings
from enum import Enum
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

__all__ = [
    "LossBase",
    "LossReduction",
    "TermRecorder",
    "WEIGHT_SCHEMES",
    "check_reduction",
    "check_number",
    "check_choice",
    "check_bool",
    "check_class_counts",
    "check_per_class",
    "class_weights_from_counts",
    "resolve_class_weights",
    "reduce_values",
]

#: Class weights computed from ``class_counts`` (see :func:`class_weights_from_counts`).
WEIGHT_SCHEMES = ("inverse_freq", "sqrt_inverse_freq", "effective_number")


class LossReduction(str, Enum):
    """How per-sample losses are reduced: ``mean`` over samples, ``sum`` or ``none`` (shape ``(B,)``)."""

    MEAN = "mean"
    SUM = "sum"
    NONE = "none"


# ------------------------------------------------------------------------------------ validation
def check_reduction(loss: str, reduction: Any) -> str:
    """Normalise ``reduction`` to a str in {mean, sum, none}; ValueError/TypeError naming ``loss``."""
    if isinstance(reduction, LossReduction):
        return reduction.value
    if not isinstance(reduction, str):
        raise TypeError(f"loss {loss!r}: reduction must be a str, got {type(reduction).__name__} {reduction!r}; "
                        f"allowed: mean, sum, none")
    try:
        return LossReduction(reduction).value
    except ValueError:
        raise ValueError(f"loss {loss!r}: reduction={reduction!r} is not allowed; allowed: mean, sum, none") from None


def check_number(
    loss: str,
    arg: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
    integer: bool = False,
) -> float | int:
    """Check that ``value`` is a real (or int) number in the given range; returns it as float/int."""
    kind = "an int" if integer else "a number"
    ok_type = isinstance(value, numbers.Integral) if integer else isinstance(value, numbers.Real)
    if isinstance(value, bool) or not ok_type:
        raise TypeError(f"loss {loss!r}: {arg} must be {kind}, got {type(value).__name__} {value!r}")
    value = int(value) if integer else float(value)
    if not integer and not math.isfinite(value):
        raise ValueError(f"loss {loss!r}: {arg} must be finite, got {value!r}")
    low_bad = minimum is not None and (value < minimum if min_inclusive else value <= minimum)
    high_bad = maximum is not None and (value > maximum if max_inclusive else value >= maximum)
    if low_bad or high_bad:
        lo = "" if minimum is None else f"{minimum} {'<=' if min_inclusive else '<'} "
        hi = "" if maximum is None else f" {'<=' if max_inclusive else '<'} {maximum}"
        raise ValueError(f"loss {loss!r}: {arg}={value!r} is out of range; allowed: {lo}{arg}{hi}")
    return value


def check_choice(loss: str, arg: str, value: Any, allowed: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"loss {loss!r}: {arg} must be a str, got {type(value).__name__} {value!r}; "
                        f"allowed: {', '.join(allowed)}")
    if value not in allowed:
        raise ValueError(f"loss {loss!r}: {arg}={value!r} is not allowed; allowed: {', '.join(allowed)}")
    return value


def check_bool(loss: str, arg: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"loss {loss!r}: {arg} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _check_sequence(loss: str, arg: str, value: Any) -> list[float]:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) and not hasattr(value, "tolist"):
        raise TypeError(f"loss {loss!r}: {arg} must be a list of numbers, got {type(value).__name__} {value!r}")
    if hasattr(value, "tolist") and not isinstance(value, Sequence):
        value = value.tolist()
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"loss {loss!r}: {arg} must be a list of numbers, got element {v!r} in {list(value)!r}")
        if not math.isfinite(float(v)):
            raise ValueError(f"loss {loss!r}: {arg} must be finite, got {list(value)!r}")
        out.append(float(v))
    return out


def check_per_class(loss: str, arg: str, value: Any, length: int | None, what: str = "classes") -> list[float]:
    """Validate a per-class list (``alpha``, ``class_weights``, ...): ``length`` finite numbers >= 0
    (any length when ``length`` is None); the message says how many ``what`` there are."""
    values = _check_sequence(loss, arg, value)
    if length is not None and len(values) != length:
        raise ValueError(f"loss {loss!r}: {arg} has {len(values)} entries {values!r} but there are {length} {what}")
    if any(v < 0 for v in values):
        raise ValueError(f"loss {loss!r}: {arg} must be >= 0, got {values!r}")
    return values


def check_class_counts(loss: str, class_counts: Any, num_classes: int | None = None, *, required: bool = True) -> list[float] | None:
    """Validate ``class_counts`` (a list of K >= 2 non-negative numbers, matching ``num_classes``)."""
    if class_counts is None:
        if required:
            raise ValueError(f"loss {loss!r}: class_counts is required (a list of per-class training sample "
                             f"counts, e.g. class_counts=[300, 100, 50]); got None")
        return None
    counts = _check_sequence(loss, "class_counts", class_counts)
    if len(counts) < 2:
        raise ValueError(f"loss {loss!r}: class_counts needs at least 2 classes, got {counts!r}")
    if any(c < 0 for c in counts):
        raise ValueError(f"loss {loss!r}: class_counts must be >= 0, got {counts!r}")
    if num_classes is not None and len(counts) != num_classes:
        raise ValueError(f"loss {loss!r}: class_counts has {len(counts)} entries but num_classes={num_classes}")
    if any(c == 0 for c in counts):
        warnings.warn(f"loss {loss!r}: class_counts {counts!r} has empty classes; counted as 1 for weighting",
                      stacklevel=3)
    return counts


def class_weights_from_counts(class_counts: Sequence[float], scheme: str, beta: float = 0.9999) -> torch.Tensor:
    """Per-class weights from training counts ``n_c``, normalised to sum to K.

    * ``inverse_freq``: ``w_c ∝ 1 / n_c``
    * ``sqrt_inverse_freq``: ``w_c ∝ 1 / sqrt(n_c)``
    * ``effective_number`` (Cui et al., "Class-Balanced Loss Based on Effective Number of Samples",
      CVPR 2019, arXiv:1901.05555): ``w_c ∝ (1 - β) / (1 - β^{n_c})``

    Empty classes are counted as 1.

    >>> class_weights_from_counts([10, 10], "inverse_freq").tolist()
    [1.0, 1.0]
    """
    counts = torch.tensor([max(float(c), 1.0) for c in class_counts], dtype=torch.float64)
    if scheme == "inverse_freq":
        w = 1.0 / counts
    elif scheme == "sqrt_inverse_freq":
        w = 1.0 / counts.sqrt()
    elif scheme == "effective_number":
        w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    else:
        raise ValueError(f"unknown class weight scheme {scheme!r}; allowed: {', '.join(WEIGHT_SCHEMES)}")
    return (w / w.sum() * len(counts)).float()


def resolve_class_weights(
    loss: str,
    class_weights: Any,
    class_counts: Any,
    num_classes: int | None,
    beta: float = 0.9999,
    arg: str = "class_weights",
) -> torch.Tensor | None:
    """Turn a ``class_weights`` option into a ``(K,)`` float tensor (or None).

    ``class_weights`` is None (no weighting), a list of K numbers used as given (e.g. the RSNA
    competition weights ``[1, 2, 4]``), or one of :data:`WEIGHT_SCHEMES` computed from ``class_counts``.
    """
    if class_weights is None:
        return None
    if isinstance(class_weights, str):
        check_choice(loss, arg, class_weights, WEIGHT_SCHEMES)
        if class_counts is None:
            raise ValueError(f"loss {loss!r}: {arg}={class_weights!r} needs class_counts (per-class training "
                             f"counts); got class_counts=None")
        counts = check_class_counts(loss, class_counts, num_classes)
        return class_weights_from_counts(counts, class_weights, beta)
    weights = check_per_class(loss, arg, class_weights, expected_classes(num_classes, class_counts))
    if len(weights) < 1 or sum(weights) <= 0:
        raise ValueError(f"loss {loss!r}: {arg} must contain a positive weight, got {weights!r}")
    return torch.tensor(weights, dtype=torch.float32)


def expected_classes(num_classes: int | None, class_counts: Any) -> int | None:
    """K for a per-class list: ``num_classes``, else the length of ``class_counts``, else unknown (None)."""
    if num_classes is not None:
        return num_classes
    return len(class_counts) if class_counts is not None else None


def reduce_values(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-sample values ``(B,)``: mean over samples, sum, or unchanged."""
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


# ------------------------------------------------------------------------------------------ base
class TermRecorder(nn.Module):
    """Keeps the named terms of a loss's last forward: the one copy of this mechanism.

    A composite loss (``compound``, ``dice_boundary``, the distillation losses, the multi-task
    objectives) calls :meth:`record_terms` in its forward; the training loop reads :meth:`term_tensors`
    (summed on the device, logged as ``train/loss_<term>``), anything else :meth:`terms`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._terms: dict[str, torch.Tensor] = {}

    def record_terms(self, /, **values: torch.Tensor) -> None:
        """Keep each term's value of this forward, detached and averaged over the batch (0-d); replaces
        the previous forward's terms."""
        self._terms = {name: value.detach().mean() for name, value in values.items()}

    def terms(self) -> dict[str, float]:
        """Per-term values of the last forward (logged as ``train/loss_<term>``). Empty by default."""
        return {name: float(value) for name, value in self._terms.items()}

    def term_tensors(self) -> dict[str, torch.Tensor]:
        """:meth:`terms` as the detached 0-d tensors they were computed as (no host read)."""
        return dict(self._terms)


class LossBase(TermRecorder):
    """Base class of every registered loss (see the module docstring for the contract).

    Args:
        reduction: ``"mean"`` (default; mean over samples), ``"sum"`` or ``"none"`` (``(B,)``).

    Raises:
        ValueError: ``reduction`` is not one of mean, sum, none.
    """

    family: ClassVar[str] = "classification"
    name: ClassVar[str] = "loss"
    #: The classifier head this loss expects: "linear" (default) or "normed_linear" (cosine logits in
    #: [-1, 1], see :class:`losslab.losses.classification.NormedLinear`; LDAM). A hint for model builders.
    head: ClassVar[str] = "linear"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "task" in vars(cls):  # the former name would be ignored: say so at definition
            raise TypeError(f"loss class {cls.__name__} sets task={vars(cls)['task']!r}; a loss names the kind of "
                            f"target it is for with family (e.g. family = 'segmentation')")

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(self.name, reduction)

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        """Reduce per-sample values ``(B,)`` according to ``self.reduction``."""
        return reduce_values(values, self.reduction)

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the engine at the start of each epoch (0-based). No-op by default."""

    def output_dim(self, num_classes: int) -> int:
        """The number of logits the model head must produce for ``num_classes`` classes (K)."""
        return num_classes

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, K)`` from head outputs (softmax over dim 1)."""
        return torch.softmax(logits, dim=1)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Predicted class labels ``(B,)`` (argmax of :meth:`probabilities`)."""
        return self.probabilities(logits).argmax(dim=1)

    def weights(self) -> dict[str, float]:
        """Current term weights (logged as ``loss_weight/<term>``). Empty by default."""
        return {}

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"
