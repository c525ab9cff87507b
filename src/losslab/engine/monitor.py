"""Which epoch is the best one: the monitored metric, then tie-break metrics.

A model that predicts one class scores a balanced accuracy of exactly ``1/K`` at every such epoch;
keeping the first of those epochs keeps the weakest model. :class:`BestModelRule` compares an
epoch with the best so far on ``train.monitor`` and, on a tie (equal within ``tie_tolerance``),
on each of ``train.monitor_tiebreak`` in turn (default ``val/auc`` higher, then ``val/loss``
lower). When every key ties the earlier epoch stays best.

Example:
    >>> rule = BestModelRule("val/balanced_accuracy", "max", [("val/auc", "max"), ("val/loss", "min")])
    >>> best = {"val/balanced_accuracy": 0.5, "val/auc": 0.64, "val/loss": 0.7}
    >>> rule.compare({"val/balanced_accuracy": 0.5, "val/auc": 0.89, "val/loss": 0.9}, best)
    (True, 'tie on val/balanced_accuracy=0.5; val/auc 0.89 > 0.64')
"""

from __future__ import annotations

import math
from typing import Iterable, Literal

Mode = Literal["max", "min"]
TIE_TOLERANCE = 1e-9


#: lower is better: a metric whose name (after its last ``/``) contains one of these
LOWER_IS_BETTER = ("loss", "ece", "brier", "hd95", "dead_class", "rsna_score")
#: higher is better: a metric whose name contains one of these (and none of the above)
HIGHER_IS_BETTER = ("accuracy", "auc", "f1", "recall", "precision", "dice", "kappa", "specificity", "sensitivity",
                    "objective")


def metric_mode(metric: str) -> Mode | None:
    """``min`` for losses (``loss``, ``log_loss``, ``rsna_score``), ECE, Brier, HD95 and dead-class
    counts, ``max`` for rates and overlaps (accuracy, AUC, F1, recall, precision, Dice, ...), None
    when the name does not say (``pred_count_*``, ``lr``, timings).

    >>> [metric_mode(k) for k in ("val/loss", "test/hd95_WT", "val/mean_dice", "val/pred_count_HGG")]
    ['min', 'min', 'max', None]
    """
    name = metric.rsplit("/", 1)[-1].lower()
    if any(word in name for word in LOWER_IS_BETTER):
        return "min"
    if any(word in name for word in HIGHER_IS_BETTER):
        return "max"
    return None


def default_mode(metric: str) -> Mode:
    """:func:`metric_mode`, ``max`` where the name does not say."""
    return metric_mode(metric) or "max"


def _finite(value: float | None) -> bool:
    return value is not None and not math.isnan(float(value))


class BestModelRule:
    """Decides whether an epoch's metrics beat the best so far.

    Args:
        monitor: the metric key (e.g. ``val/balanced_accuracy``).
        mode: ``max`` or ``min``.
        tiebreak: ``(metric, mode)`` pairs compared in order when ``monitor`` ties; a mode of None
            is :func:`default_mode` of the metric.
        tie_tolerance: two values closer than this are equal (default 1e-9).
    """

    def __init__(self, monitor: str, mode: Mode, tiebreak: Iterable[tuple[str, Mode | None]] = (),
                 tie_tolerance: float = TIE_TOLERANCE) -> None:
        self.monitor = monitor
        self.mode = mode
        self.tiebreak = [(str(k), m or default_mode(str(k))) for k, m in tiebreak]
        self.tie_tolerance = float(tie_tolerance)

    @classmethod
    def from_config(cls, train_cfg) -> "BestModelRule":
        """From ``train.monitor``, ``train.monitor_mode`` and ``train.monitor_tiebreak``."""
        tiebreak = train_cfg.tiebreak_rules() if hasattr(train_cfg, "tiebreak_rules") else []
        return cls(train_cfg.monitor, train_cfg.monitor_mode, tiebreak)

    @property
    def keys(self) -> list[str]:
        """The monitored key, then the tie-break keys (the values a best epoch remembers)."""
        return [self.monitor] + [k for k, _ in self.tiebreak]

    def _order(self, new: float | None, old: float | None, mode: Mode) -> int:
        """+1 when ``new`` is better than ``old``, -1 when worse, 0 on a tie; a missing or NaN
        value loses against a finite one and ties with another missing one."""
        if not _finite(new) or not _finite(old):
            return int(_finite(new)) - int(_finite(old))
        diff = float(new) - float(old)
        if abs(diff) <= self.tie_tolerance:
            return 0
        return 1 if (diff > 0) == (mode == "max") else -1

    def compare(self, metrics: dict[str, float], best: dict[str, float] | None) -> tuple[bool, str | None]:
        """``(improved, tie_break_note)``: the note says which tie-break decided, else None.

        An epoch whose monitored value is NaN never becomes best; the first finite one always does."""
        value = metrics.get(self.monitor)
        if not _finite(value):
            return False, None
        if best is None or not _finite(best.get(self.monitor)):
            return True, None
        order = self._order(value, best.get(self.monitor), self.mode)
        if order:
            return order > 0, None
        for key, mode in self.tiebreak:
            order = self._order(metrics.get(key), best.get(key), mode)
            if order:
                if order < 0:
                    return False, None
                sign = ">" if mode == "max" else "<"
                return True, (f"tie on {self.monitor}={float(value):.6g}; "
                              f"{key} {float(metrics[key]):.6g} {sign} {_fmt(best.get(key))}")
        return False, None

    def remember(self, metrics: dict[str, float]) -> dict[str, float]:
        """The values of :attr:`keys` in ``metrics`` (what a best epoch is compared by later)."""
        return {k: float(metrics[k]) for k in self.keys if k in metrics}


def _fmt(value: float | None) -> str:
    return "nan" if not _finite(value) else f"{float(value):.6g}"
