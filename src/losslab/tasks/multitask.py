"""The multitask task: image + text, one head per task (``losslab distill``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from losslab.engine.steps import Step, StepOutput
from losslab.tasks.base import CaseCacheMixin, FoldSetup, Task, TaskError, check_loss_with_counts, register_task


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
    """Image + text → one head per task (``model.kind: multimodal``). The teacher and each student of a
    ``losslab distill`` invocation are ``train_fold`` runs of this task (:mod:`losslab.pipelines.distill`
    orchestrates them, as cross-validation does its folds), through the same
    :func:`losslab.engine.loop.fit` as the other tasks, with :class:`MultitaskStep`.

    The config says which run it is (``distill.run``: :class:`losslab.schema.DistillRunConfig`): the
    teacher (``distill.teacher.model`` on the labels), a student (``distill.student.model``; the loss
    ``distill.run.loss`` of ``distill.losses`` distils from the teacher's cached outputs that
    ``distill.run.teacher_outputs`` names) or the student alone (on the labelled training cases only).
    The data are :mod:`losslab.tasks.multitask_data`'s; ``data.normalize`` unset means the training cases'
    channel statistics. A model is rebuilt from the vocabulary of its training captions: the registry's
    spec (:func:`losslab.models.export.multimodal_spec`) carries it, so :meth:`build` and :meth:`rebuild`
    (from one config alone) refuse."""

    name = "multitask"
    model_kinds = ("multimodal",)
    default_monitor = ("val/mean_accuracy", "max")
    default_tiebreak = ("val/loss",)
    default_model_name = "losslab-multitask"
    entry_points = ("distill",)

    def __init__(self, task_classes: dict[str, list[str]] | None = None) -> None:
        self.task_classes = dict(task_classes or {})

    def build_cache(self, cfg, force=False):
        """The case cache; a manifest is first checked for its captions and ``distill.tasks`` columns."""
        from losslab.tasks.multitask_data import check_manifest

        check_manifest(cfg)
        return super().build_cache(cfg, force)

    def output_names(self, cfg, info=None):
        """The heads: ``distill.tasks``, else every ``task_*`` column of the cache."""
        if self.task_classes:
            return list(self.task_classes)
        from losslab.tasks.multitask_data import task_names

        return task_names(cfg, info if info is not None else self.load_cache(cfg))

    def check_loss(self, cfg, num_classes):
        check_loss_with_counts(cfg, num_classes)

    def test_loader(self, cfg, info, normalizer=None):
        """The held-out test cases prepared as the run's validation cases (``normalizer``: their
        :class:`~losslab.tasks.multitask_data.InputPrep`); None without test cases."""
        from losslab.data.splits import TEST_FOLD
        from losslab.data.text import task_classes_from_index
        from losslab.tasks.multitask_data import case_loader

        if normalizer is None:
            raise TaskError(f"task {self.name!r}: the test split is prepared with the model's tokenizer and "
                            "preprocessing (the validation dataset's normalizer); none was given")
        test = info.index[info.index["fold"] == TEST_FOLD].reset_index(drop=True)
        if len(test) == 0:
            return None
        task_classes = task_classes_from_index(info.index, self.output_names(cfg, info))
        return case_loader(cfg, normalizer.dataset(test, info.cache_dir, task_classes))

    def build(self, cfg, names, class_counts=None, fractions=None):
        raise self._needs_captions("build")

    def step(self, cfg, loss_fn, names):
        """A :class:`MultitaskStep` of the heads, without a teacher (:meth:`setup_fold` gives a student its own)."""
        return MultitaskStep(self.task_classes)

    def setup_fold(self, cfg, info, fold):
        """The run ``distill.run`` names: its model (random weights from the run's seed), its training
        cases and loaders, its objective and a step with the teacher's outputs (a student)."""
        from losslab.engine.callbacks import ReseedEachEpoch
        from losslab.losses.multitask import labelled_subset
        from losslab.models.export import multimodal_spec
        from losslab.models.multimodal import build_multimodal_model
        from losslab.tasks.multitask_data import InputPrep, fold_loaders, prepare_multitask_data

        section, run = distill_run(cfg)
        d = prepare_multitask_data(cfg, info)
        student = run.role != "teacher"
        model = build_multimodal_model((section.student if student else section.teacher).model, d.task_classes,
                                       texts=d.texts, in_chans=d.in_chans)
        model.preprocessing = d.preprocessing
        labelled = labelled_subset(d.train_df["label"], section.student_label_fraction, cfg.data.seed)
        cases = d.train_df[labelled].reset_index(drop=True) if run.role == "student_alone" else d.train_df
        train_loader, val_loader = fold_loaders(cfg, d, cases, InputPrep.of(model, d.preprocessing))
        loss_fn, step, params = _objective(cfg, section, run, d, model, labelled)
        if student:
            params |= {"data.n_train_cases": len(cases)}
        return FoldSetup(train_loader, val_loader, loss_fn, model, step, list(d.task_classes),
                         multimodal_spec(model, d.in_chans), params,
                         tags={"losslab.split_fingerprint": d.info.split_fingerprint},
                         callbacks=[ReseedEachEpoch(train_loader, cfg.train.seed)])

    def rebuild(self, cfg, run_tags, run_params):
        raise self._needs_captions("rebuild")

    def spec(self, cfg, names, class_counts=None):
        raise self._needs_captions("spec")

    def input_example(self, cfg, val_loader):
        """None: a multimodal model is logged without a signature (its inputs are an image and a caption)."""
        return None

    def _needs_captions(self, what: str) -> TaskError:
        return TaskError(f"task {self.name!r}: {what} needs the vocabulary of the training captions; a run's model "
                         "comes from setup_fold, a registered one from its spec (models.export.multimodal_spec)")

    def split_summary(self, outputs, dataset, names, prefix, intervals=None):
        return {}

    def epoch_figures(self, state, final, names):
        """The learning curves: losses and the mean accuracy and macro F1 over the heads."""
        from losslab import plots

        hist = state.history
        keys = [k for k in ("train/loss", "val/loss", "val/mean_balanced_accuracy", "val/mean_f1_macro") if k in hist]
        return {"plots/curves.png": plots.plot_curves(hist, keys),
                "plots/loss_curves.png": plots.plot_curves(hist, [k for k in ("train/loss", "val/loss") if k in hist])}



def distill_run(cfg: Any) -> tuple[Any, Any]:
    """``(the distill section, its run)``: which run of a distill invocation ``cfg`` trains
    (:class:`losslab.schema.DistillRunConfig`; the teacher when unset)."""
    from losslab.schema import DistillConfig, DistillRunConfig

    section = cfg.distill if isinstance(cfg.distill, DistillConfig) else DistillConfig.model_validate(cfg.distill or {})
    return section, section.run or DistillRunConfig()


def _objective(cfg: Any, section: Any, run: Any, d: Any, model: Any, labelled: Any) -> tuple[Any, Any, dict]:
    """``(objective, step, params)`` of the run: the labels only (the teacher, the student alone) or a
    distillation loss of ``distill.losses`` from the teacher's outputs on the training cases."""
    import json

    from losslab.losses.multitask import LabelsOnly, MultiTaskDistillation
    from losslab.tasks.multitask_data import teacher_rows

    params = {"model.spec": json.dumps((section.teacher if run.role == "teacher" else section.student).model)[:6000],
              "epochs": cfg.train.epochs, "lr": cfg.optim.lr}
    if run.role == "teacher":
        return LabelsOnly(d.tasks), MultitaskStep(d.task_classes), params
    params |= {"teacher_uri": run.teacher_uri or "", "student_label_fraction": section.student_label_fraction,
               "teacher_cache_key": Path(run.teacher_outputs).stem if run.teacher_outputs else ""}
    if run.role == "student_alone":
        params |= {"loss.params": "{}", "loss.ce_weight": 1.0, "loss.distill_weight": 0.0}
        return LabelsOnly(d.tasks, ce_weight=1.0), MultitaskStep(d.task_classes), params
    loss_params = dict(next(p for name, p in section.loss_specs() if name == run.loss))
    ce_weight = float(loss_params.pop("ce_weight", section.ce_weight))
    distill_weight = float(loss_params.pop("distill_weight", section.distill_weight))
    if not run.teacher_outputs:
        raise TaskError(f"distill.run: the student {run.loss!r} needs the teacher's outputs (teacher_outputs)")
    teacher = teacher_rows(run.teacher_outputs, d.train_df)
    objective = MultiTaskDistillation(run.loss, loss_params, d.tasks, model.feature_dim,
                                      int(teacher["features"].shape[1]), num_data=len(d.train_df),
                                      ce_weight=ce_weight, distill_weight=distill_weight)
    params |= {"loss.params": json.dumps(loss_params)[:6000], "loss.ce_weight": ce_weight,
               "loss.distill_weight": distill_weight}
    return objective, MultitaskStep(d.task_classes, teacher, None if labelled.all() else torch.as_tensor(labelled)), params
