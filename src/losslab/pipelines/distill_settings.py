"""The ``distill:`` section resolved: losses, weights, monitor, batch size, teacher and student specs.

See :mod:`losslab.pipelines.distill` for the keys; the section is typed by
:class:`losslab.config.DistillConfig`, so a typo is refused when the config loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from losslab.config import ExperimentConfig, section_dict
from losslab.losses.multitask import DISTILL_LOSSES

#: the teacher and student built when ``distill.teacher.model`` / ``distill.student.model`` are not set
DEFAULT_TEACHER = {"fusion": "cross_attention", "fusion_dim": 64, "fusion_layers": 2,
                   "image": {"backbone": "vit_tiny_patch16_224", "kwargs": {"img_size": 64, "patch_size": 8}},
                   "text": {"name": "small_transformer", "dim": 64, "depth": 2, "max_length": 32}}
DEFAULT_STUDENT = {"fusion": "cross_attention", "fusion_dim": 32, "fusion_layers": 1,
                   "image": {"backbone": "test_vit", "kwargs": {"img_size": 64, "patch_size": 8}},
                   "text": {"name": "small_transformer", "dim": 32, "depth": 1, "max_length": 32}}


@dataclass
class DistillSettings:
    """The ``distill:`` section with its defaults filled in (``batch_size`` from ``data.batch_size``,
    ``cache_dir`` under ``data.cache_dir``) and each loss as ``(name, its parameters)``."""

    tasks: Any
    losses: list[tuple[str, dict[str, Any]]]
    student_alone: bool
    student_label_fraction: float
    ce_weight: float
    distill_weight: float
    monitor: str
    cache_dir: Path
    batch_size: int
    teacher: dict[str, Any]
    student: dict[str, Any]


_TOP_KEYS = {"tasks", "losses", "student_alone", "student_label_fraction", "ce_weight", "distill_weight", "monitor", "cache_dir", "batch_size",
             "teacher", "student"}
_TEACHER_KEYS = {"model_uri", "allow_pickle", "model", "epochs", "lr", "registered_model_name", "alias"}
_STUDENT_KEYS = {"model", "epochs", "lr", "registered_model_name"}


def distill_settings(cfg: ExperimentConfig) -> DistillSettings:
    """The resolved ``distill:`` section; an unknown key or loss, a bad fraction or mixup is refused."""
    d = section_dict(cfg.distill)  # the keys the config set (typed by losslab.config.DistillConfig)
    if cfg.train.mixup_alpha:
        raise ValueError(f"train.mixup_alpha={cfg.train.mixup_alpha}: mixup mixes one label per case and cannot mix "
                         f"the per-task labels and teacher outputs of distill; set it to 0")
    unknown = sorted(set(d) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"distill: unknown key(s) {unknown}; accepted: {', '.join(sorted(_TOP_KEYS))}")
    teacher, student = dict(d.get("teacher") or {}), dict(d.get("student") or {})
    for section, keys, value in (("teacher", _TEACHER_KEYS, teacher), ("student", _STUDENT_KEYS, student)):
        bad = sorted(set(value) - keys)
        if bad:
            raise ValueError(f"distill.{section}: unknown key(s) {bad}; accepted: {', '.join(sorted(keys))}")
    losses = []
    for entry in d.get("losses", ["vanilla"]) or []:
        spec = {"name": entry} if isinstance(entry, str) else dict(entry)
        if "name" not in spec:
            raise ValueError(f"distill.losses: entry {entry!r} has no name")
        name = str(spec.pop("name"))
        if name not in DISTILL_LOSSES:
            raise ValueError(f"distill.losses: unknown loss {name!r}; expected one of {', '.join(DISTILL_LOSSES)}")
        losses.append((name, spec))
    cache_dir = Path(d.get("cache_dir") or Path(cfg.data.cache_dir) / "teacher_outputs")
    fraction = d.get("student_label_fraction", 1.0)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"distill.student_label_fraction must be a number in (0, 1], got {fraction!r}")
    return DistillSettings(tasks=d.get("tasks"), losses=losses, student_alone=bool(d.get("student_alone", True)),
                     student_label_fraction=float(fraction),
                     ce_weight=float(d.get("ce_weight", 1.0)), distill_weight=float(d.get("distill_weight", 1.0)),
                     monitor=str(d.get("monitor", "val/mean_accuracy")), cache_dir=cache_dir,
                     batch_size=int(d.get("batch_size") or cfg.data.batch_size), teacher=teacher, student=student)
