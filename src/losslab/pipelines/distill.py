"""distill: image + text teacher/student distillation with several tasks per sample, logged to MLflow.

One ``losslab distill`` (``mlflow run . -e distill``) opens a parent run ``distill`` and, nested in it:

* a **teacher** run (tag ``losslab.role=teacher``, ``losslab.loss=teacher``): the teacher is trained
  here and registered (``distill.teacher.registered_model_name``, alias ``distill.teacher.alias``), or
  loaded from the registry (``distill.teacher.model_uri: models:/name/1`` or ``models:/name@alias``)
  and only evaluated (loaded as safetensors weights + spec, rebuilt by our code; see
  :mod:`losslab.pipelines.registry`);
* one **student** run per loss in ``distill.losses`` (``losslab.role=student``, ``losslab.loss=<loss>``);
* a **student alone** run (``losslab.role=student_alone``, ``losslab.loss=none``): the same student,
  the same initial weights and batch order, trained on the labels only (``distill.student_alone``).

Each of them is a fold run of the ``multitask`` task (``losslab.entry_point=train``, ``losslab.task=multitask``,
``losslab.fold``, ``losslab.seed``; the loss settings as ``loss.*`` params), so ``compare`` reads them as any
runs: ``losslab compare -e <experiment> --group-by losslab.loss --metric mean_accuracy`` with a ``--filter`` on
``tags.losslab.role`` or on the parent (``tags.mlflow.parentRunId``).

The data are :mod:`losslab.pipelines.distill_data`'s: every ``data.*`` key the other tasks honour
(the training cases with ``data.imbalance`` and ``data.train_cases``, ``data.sampler``,
``data.augment``, ``data.normalize``, ``data.num_workers``) is honoured there or refused when the
config loads; the ``distill:`` section is :class:`losslab.schema.DistillConfig` (its defaults and checks
live there only). The other phases have their own modules: :mod:`~losslab.pipelines.distill_teacher` (the teacher run and its
output cache), :mod:`~losslab.pipelines.distill_fit` (one run's fit, latency, summary and model),
:mod:`~losslab.pipelines.distill_resume` (``--resume``), :mod:`~losslab.pipelines.distill_tables`
(reading the runs back); this module runs the students and the whole invocation.

The teacher's outputs (per-task logits and the fused feature) are computed once for every case of the
cache and stored in ``<distill.cache_dir>/<key>.npz``; the key hashes the teacher's weights and origin,
its preprocessing and the data fingerprint, so a second run with the same teacher and data reuses
the file (the parent and student runs carry the tag ``losslab.teacher_cache`` = ``reused`` or
``computed``).

The teacher and every student train through the engine's :func:`losslab.engine.loop.fit` with the
``multitask`` task (:class:`losslab.tasks.MultitaskTask`): ``train.*`` works as in ``losslab train``
(bf16 autocast on CUDA, clipping, EMA, SWA, early stopping, the alarms, atomic ``best``/``last``
checkpoints in ``<train.checkpoint_dir>/<run id>`` uploaded to the run's ``checkpoints/``); the
objectives are :mod:`losslab.losses.multitask`. Every run logs per epoch ``train/loss``,
``train/loss_<term>`` (``ce/<task>``, ``kd/<task>``, ``hint``, ``crd``, ...), ``train/lr``,
``val/loss`` (Σ_t cross-entropy), ``val/<task>/{accuracy,f1_macro,auc,balanced_accuracy}``,
``val/mean_{accuracy,f1_macro,balanced_accuracy}``; at the end the best epoch's (by
``distill.monitor``) weights are scored again on the validation split that picked them as
``best_val/<task>/…``, with ``best_epoch``, and on the held-out test split (fold −1, ``data.test_fraction``)
as ``test/<task>/…`` and ``test/mean_…``, with the latency ``evaluate`` reports (``latency/p50_ms``,
``latency/p95_ms``, ``latency/throughput_per_s``: :func:`losslab.engine.latency.measure_latency`,
warm-up and repeats from ``evaluate.latency``). :func:`distillation_table` reads them back as one row
per run: the test split's scores when the runs have them, else (no test split) the validation split's,
its ``split`` column saying which.

``distill:`` keys (all optional; ``configs/experiment/distill_*.yaml`` are complete examples)::

    tasks: [modality, location]     # manifest columns; or {task: [class names]}; default all task_* columns
    losses: [vanilla, crd, {name: rkd, distance_weight: 25.0}]   # a name or {name, loss params...}
                                    # vanilla = kd; per loss also ce_weight / distill_weight (below)
    student_alone: true             # also train the student on the labels only
    student_label_fraction: 1.0     # in (0, 1]: the students see the labels of only this fraction of the
                                    # training cases (drawn per class with data.seed; logged as
                                    # data.n_train_labelled); the distillation term still covers every
                                    # training case, and the student alone trains on the labelled ones
    ce_weight: 1.0                  # weight of Σ_task CE(student, labels)
    distill_weight: 1.0             # weight of the distillation term
    monitor: val/mean_accuracy      # picks the best epoch (max)
    cache_dir: null                 # teacher outputs; default <data.cache_dir>/teacher_outputs
    batch_size: null                # default data.batch_size
    teacher:
      model_uri: null               # models:/... to reuse a registered teacher instead of training one
      allow_pickle: false           # true: also load a pickle-format teacher (unpickling runs its code)
      model: {image: {...}, text: {...}, fusion: cross_attention, ...}  # build spec, see
                                    # losslab.models.multimodal.build_multimodal_model
      epochs: null                  # default train.epochs
      lr: null                      # default optim.lr
      registered_model_name: losslab-distill-teacher
      alias: teacher
    student:
      model: {...}                  # same keys as teacher.model
      epochs: null                  # default train.epochs
      lr: null                      # default optim.lr
      registered_model_name: null   # register each student when set (and tracking.log_model)

The distillation term per loss (the loss library's classes; their own CE is switched off, the
pipeline adds ``ce_weight · Σ_t CE_t``):

* ``vanilla``/``kd``: ``Σ_t T² KL(σ(t_t/T) ‖ σ(s_t/T))`` (one ``KDLoss(alpha=1)`` per task);
* ``combined``: the same KD sum plus one FitNets hint on the fused features (``hint_weight``);
* ``crd``, ``rkd``, ``mmd``: one term on the fused features (student ``D_s``, teacher ``D_t``;
  projections are learned with the student); ``crd`` in ``memory_bank`` mode gets ``num_data``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import mlflow
import numpy as np
import torch

from losslab.config import ExperimentConfig
from losslab.schema import DistillConfig
from losslab.data.cache import CacheInfo
from losslab.data.text import check_distill_data
from losslab.engine.loop import seed_everything
from losslab.losses.multitask import DISTILL_LOSSES, LabelsOnly, MultiTaskDistillation, labelled_subset
from losslab.pipelines.distill_data import DistillData, distill_loaders, distill_test_loader, prepare_distill_data
from losslab.pipelines.distill_fit import fit_run, log_distilled_model, run_latency, run_summary, run_tags
from losslab.pipelines.distill_resume import PreviousRuns, previous_runs
from losslab.pipelines.distill_tables import distillation_table
from losslab.pipelines.distill_teacher import run_teacher, teacher_outputs, teacher_train_outputs
from losslab.tasks import MultitaskStep
from losslab.tracking import log_config, log_metrics_batch, log_table_artifacts, managed_run, setup_tracking

log = logging.getLogger(__name__)

__all__ = [
    "DISTILL_LOSSES",
    "DistillResult",
    "MultiTaskDistillation",
    "distillation_table",
    "run_distill",
    "teacher_outputs",
]


@dataclass
class DistillResult:
    parent_run_id: str
    teacher_run_id: str
    student_run_ids: dict[str, str]
    teacher_cache_key: str
    teacher_cache_reused: bool
    teacher_model_uri: str | None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)


def _run_student(cfg: ExperimentConfig, s: DistillConfig, d: DistillData, plan_item: tuple, teacher_train: dict,
                 labelled: np.ndarray, teacher_uri: str | None, key: str, cache_tag: str,
                 previous: PreviousRuns | None = None) -> tuple[str, str, dict]:
    """One student run (a distillation loss, or the student alone on the labelled cases only); on a
    resume a finished one is kept and an unfinished one continues from its last checkpoint.
    Returns ``(label, run id, summary metrics)``."""
    from losslab.models.multimodal import build_multimodal_model

    name, params, role = plan_item
    st = s.student
    student_spec = st.model
    epochs, lr = int(st.epochs or cfg.train.epochs), float(st.lr or cfg.optim.lr)
    params = dict(params)
    ce_weight = float(params.pop("ce_weight", s.ce_weight))
    distill_weight = float(params.pop("distill_weight", s.distill_weight))
    distilling = role == "student"
    label = name if distilling else "none"
    previous = previous or PreviousRuns()
    done = previous.finished(label)
    if done is not None:
        return label, done.info.run_id, {k: v for k, v in done.data.metrics.items()
                                         if k.startswith(("best_", "test/", "latency/"))}
    resume_id = previous.unfinished_id(label)
    with managed_run(run_name=f"student-{name}" if distilling else "student-alone",
                     tags=run_tags(cfg, role, label) | {"losslab.teacher_cache": cache_tag}, nested=True,
                     run_id=resume_id) as run:
        run_id = run.info.run_id
        seed_everything(cfg.train.seed + cfg.data.fold, cfg.train.deterministic)  # as train_fold; same for every student
        student = build_multimodal_model(student_spec, d.task_classes, texts=d.texts, in_chans=d.in_chans)
        student.preprocessing = d.preprocessing
        cases = d.train_df if distilling else d.train_df[labelled].reset_index(drop=True)
        train_loader, val_loader = distill_loaders(cfg, student, d, cases, d.batch_size)
        if distilling:
            objective = MultiTaskDistillation(name, params, d.tasks, student.feature_dim,
                                              int(teacher_train["features"].shape[1]), num_data=len(d.train_df),
                                              ce_weight=ce_weight, distill_weight=distill_weight)
        else:
            objective = LabelsOnly(d.tasks, ce_weight=1.0)
        mlflow.log_params({"model.spec": json.dumps(student_spec)[:6000], "epochs": epochs,
                           "lr": lr, "loss.params": json.dumps(params)[:6000],
                           "loss.ce_weight": ce_weight if distilling else 1.0,
                           "loss.distill_weight": distill_weight if distilling else 0.0,
                           "teacher_uri": teacher_uri or "", "teacher_cache_key": key,
                           "student_label_fraction": s.student_label_fraction, "data.n_train_cases": len(cases)})
        step = MultitaskStep(d.task_classes, teacher_train if distilling else None,
                             torch.as_tensor(labelled) if distilling and not labelled.all() else None)
        fitted = fit_run(cfg, student, objective, step, (train_loader, val_loader), epochs, lr, s.monitor, run_id,
                         resume_id is not None, previous.callbacks, distill_test_loader(cfg, student, d, d.batch_size))
        summary = run_summary(fitted, run_latency(student, step, val_loader, cfg))
        log_metrics_batch(run_id, summary, step=fitted.best_epoch)
        if cfg.tracking.log_model:
            log_distilled_model(student, st.registered_model_name, None,
                                {"role": role, "loss": label, "run_id": run_id}, d.in_chans)
    return label, run_id, summary


def distill_section(cfg: ExperimentConfig) -> DistillConfig:
    """The ``distill:`` section as the schema validated it (its defaults when the config has none)."""
    section = cfg.distill
    return section if isinstance(section, DistillConfig) else DistillConfig.model_validate(section or {})


def run_distill(cfg: ExperimentConfig, info: CacheInfo | None = None, resume_run_id: str | None = None,
                extra_callbacks: list | None = None) -> DistillResult:
    """Teacher (trained or from the registry), teacher-output cache, one student per loss, student alone.

    ``resume_run_id``: a distill parent run that was stopped or killed (same config): its finished
    teacher and students are kept, an unfinished one continues from its last checkpoint (and ends with
    the metrics of an uninterrupted run), the missing ones run. ``extra_callbacks`` go to every fit."""
    check_distill_data(cfg)  # as when the config loaded: a config built in code skips that
    s = distill_section(cfg)
    setup_tracking(cfg.tracking)
    previous = PreviousRuns(previous_runs(resume_run_id) if resume_run_id else {}, list(extra_callbacks or []))
    d = prepare_distill_data(cfg, s.tasks, info)
    nested = mlflow.active_run() is not None
    with managed_run(run_name=cfg.tracking.run_name or "distill",
                     tags={"losslab.entry_point": "distill", "losslab.distill_parent": "true",
                           "losslab.dataset": cfg.data.source}, nested=nested, run_id=resume_run_id) as parent:
        parent_id = parent.info.run_id
        labelled = labelled_subset(d.train_df["label"], s.student_label_fraction, cfg.data.seed)
        if resume_run_id is None:
            log_config(cfg)
            mlflow.log_params({"distill.task_classes": json.dumps(d.task_classes), "data.n_train": len(d.train_df),
                               "data.n_val": len(d.val_df), "data.n_test": len(d.test_df),
                               "data.n_train_labelled": int(labelled.sum())})
        all_metrics: dict[str, dict[str, float]] = {}
        teacher, teacher_run, teacher_uri, origin = run_teacher(cfg, s, d, all_metrics, previous)
        teacher_train, key, cache_tag = teacher_train_outputs(teacher, d, s, origin)
        plan = [(name, params, "student") for name, params in s.loss_specs()]
        if s.student_alone:
            plan.append(("none", {}, "student_alone"))
        runs: dict[str, str] = {}
        for item in plan:
            label, run_id, summary = _run_student(cfg, s, d, item, teacher_train, labelled, teacher_uri, key,
                                                  cache_tag, previous)
            runs[label], all_metrics[label] = run_id, summary
        log_table_artifacts(distillation_table(cfg.tracking.experiment, parent_run_id=parent_id), "distillation_table")
    return DistillResult(parent_id, teacher_run, runs, key, cache_tag == "reused", teacher_uri, all_metrics)
