"""The multitask task: image + text, one head per task (``losslab distill``)."""

from __future__ import annotations

from typing import Any

import torch

from losslab.engine.steps import Step, StepOutput
from losslab.tasks.base import CaseCacheMixin, Task, TaskError, check_loss_with_counts, register_task


class MultitaskStep(Step):
    """Image + text batches → one head per task, for :func:`losslab.engine.loop.fit`.

    The model returns ``({task: logits (B, K_t)}, fused features (B, D))``; the objective is one of
    :mod:`losslab.losses.multitask`. A student distils from ``teacher``: the teacher's outputs on the
    training cases (``logits/<task> (N, K_t)``, ``features (N, D_t)``), looked up by the batch's
    ``index`` (the row of the training set); ``labelled (N,)`` bool hides the labels of the other
    training cases from the objective (:data:`losslab.losses.multitask.UNLABELLED`). Validation
    scores every head (:func:`losslab.engine.metrics.multitask_metrics`)."""

    def __init__(self, task_classes: dict[str, list[str]] | None = None, teacher: dict[str, torch.Tensor] | None = None,
                 labelled: torch.Tensor | None = None) -> None:
        self.task_classes = dict(task_classes or {})
        self.teacher = teacher
        self.labelled = labelled
        self._on_device: dict[str, Any] = {}

    def _lookups(self, device: torch.device) -> dict[str, Any]:
        """The teacher's outputs and the labelled mask on ``device``, moved there once (not per batch)."""
        if self._on_device.get("device") != device:
            teacher = {k: v.to(device) for k, v in (self.teacher or {}).items()}
            labelled = self.labelled.to(device) if self.labelled is not None else None
            self._on_device = {"device": device, "teacher": teacher, "labelled": labelled}
        return self._on_device

    def forward(self, model, batch, device):
        text = getattr(model, "module", model).text_encoder is not None  # DDP wraps the model
        image = batch["image"].to(device, non_blocking=True)
        ids = batch["input_ids"].to(device, non_blocking=True) if text else None
        attention_mask = batch["attention_mask"].to(device, non_blocking=True) if text else None
        logits, features = model(image, ids, attention_mask)
        return StepOutput(logits, aux={"features": features, "index": batch["index"].to(device, non_blocking=True)})

    def target(self, batch, device):
        return {t: y.to(device, non_blocking=True) for t, y in batch["labels"].items()}

    def size(self, target):
        return len(next(iter(target.values())))

    def loss(self, loss_fn, out, target):
        from losslab.losses.multitask import UNLABELLED

        index, features = out.aux["index"], out.aux["features"].float()
        logits = {t: z.float() for t, z in out.logits.items()}
        lookups = self._lookups(index.device)
        if lookups["labelled"] is not None:
            seen = lookups["labelled"][index]
            target = {t: torch.where(seen, y, UNLABELLED) for t, y in target.items()}
        if self.teacher is None:
            return loss_fn(logits, logits, target, features, features, index)
        teacher = lookups["teacher"]
        t_logits = {t: teacher[f"logits/{t}"][index] for t in self.task_classes}
        return loss_fn(logits, t_logits, target, features, teacher["features"][index], index)

    @torch.no_grad()
    def predict(self, model, loader, device, loss_fn=None, amp=False):
        """``{"logits": {task: (N, K_t)}, "labels": {task: (N,)}, "features": (N, D)}`` as arrays."""
        from losslab.engine.steps import autocast

        model.eval()
        logits: dict[str, list] = {}
        labels: dict[str, list] = {}
        features = []
        for batch in loader:
            with autocast(device, amp):
                out = self.forward(model, batch, device)
            for task, value in out.logits.items():
                logits.setdefault(task, []).append(value.float().cpu())
                labels.setdefault(task, []).append(batch["labels"][task])
            features.append(out.aux["features"].float().cpu())
        return {"logits": {t: torch.cat(v).numpy() for t, v in logits.items()},
                "labels": {t: torch.cat(v).numpy() for t, v in labels.items()},
                "features": torch.cat(features).numpy()}

    def metrics(self, outputs, class_names, loss_fn=None):
        from losslab.engine.metrics import multitask_metrics

        return multitask_metrics(outputs["logits"], outputs["labels"], self.task_classes)


@register_task
class MultitaskTask(CaseCacheMixin, Task):
    """Image + text → one head per task (``model.kind: multimodal``), trained by ``losslab distill``
    through the same :func:`losslab.engine.loop.fit` as the other tasks with :class:`MultitaskStep`.

    Its cache is the case cache every classification task reads; its splits, captions, preprocessing,
    models and loaders are those of a distill invocation (:mod:`losslab.pipelines.distill_data`), which
    builds them from the teacher and the tasks it distils: the contract's methods that would build them
    from one config alone refuse, naming ``losslab distill``."""

    name = "multitask"
    model_kinds = ("multimodal",)
    default_monitor = ("val/mean_accuracy", "max")
    default_tiebreak = ("val/loss",)
    default_model_name = "losslab-multitask"
    entry_points = ("distill",)

    def __init__(self, task_classes: dict[str, list[str]] | None = None) -> None:
        self.task_classes = dict(task_classes or {})

    def _distill_only(self, what: str):
        return TaskError(f"task {self.name!r}: {what} come from a `losslab distill` invocation "
                         "(losslab.pipelines.distill_data), not from one config")

    def output_names(self, cfg, info=None):
        """The heads (``distill.tasks``), when this task was made with them."""
        if not self.task_classes:
            raise self._distill_only("the heads")
        return list(self.task_classes)

    def check_loss(self, cfg, num_classes):
        check_loss_with_counts(cfg, num_classes)

    def test_loader(self, cfg, info, normalizer=None):
        raise self._distill_only("the test loader and its preprocessing")

    def build(self, cfg, names, class_counts=None, fractions=None):
        raise self._distill_only("the models (their vocabulary and input channels)")

    def step(self, cfg, loss_fn, names):
        """A :class:`MultitaskStep` of the heads, without a teacher (distill makes its students' own)."""
        return MultitaskStep(self.task_classes)

    def setup_fold(self, cfg, info, fold):
        raise self._distill_only("a fold's splits, models and loaders")

    def rebuild(self, cfg, run_tags, run_params):
        raise self._distill_only("the models of a run")

    def spec(self, cfg, names, class_counts=None):
        raise self._distill_only("the registered spec (models.export.multimodal_spec)")

    def input_example(self, cfg, val_loader):
        raise self._distill_only("the input example")

    def split_summary(self, outputs, dataset, names, prefix, intervals=None):
        return {}

    def epoch_figures(self, state, final, names):
        """The learning curves: losses and the mean accuracy and macro F1 over the heads."""
        from losslab import plots

        hist = state.history
        keys = [k for k in ("train/loss", "val/loss", "val/mean_balanced_accuracy", "val/mean_f1_macro") if k in hist]
        return {"plots/curves.png": plots.plot_curves(hist, keys),
                "plots/loss_curves.png": plots.plot_curves(hist, [k for k in ("train/loss", "val/loss") if k in hist])}

