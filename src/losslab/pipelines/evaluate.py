"""evaluate: score a trained model on a split, with calibration, TTA and latency, in a new MLflow run.

Sources (``evaluate.source``)::

    models:/<name>@<alias>      a registered model version (safetensors weights + spec, rebuilt by our code;
                                a pickle-format model is refused unless ``evaluate.allow_pickle``)
    models:/<name>/<version>
    <run id> | runs:/<run id>   a train run: its ``config.yaml`` + ``checkpoints/best.pt`` artifacts
    <path>.pt                   a checkpoint file, rebuilt from the *given* config (``--config``)

The model, loss and data come from the source run's ``config.yaml`` (for a registered model: the run
that logged the version). Probabilities always go through the loss's ``probabilities()`` (CORAL has
K-1 outputs), and predictions through its ``predict()``, exactly as in training's validation.

Data (``evaluate.split``): ``val`` (the validation split of the fold the model was trained for —
the source run's ``losslab.fold`` / ``data.fold``; ``evaluate.fold`` may only repeat it — built with :func:`losslab.pipelines.train.make_datasets` so the numbers equal the train
run's ``best_val/*``), ``test`` (the held-out cases, ``fold == -1`` in the cache index) or ``cache``
(every case of another preprocessed cache at ``evaluate.cache_dir``).

Settings: the ``evaluate:`` section of the config (a free dict, validated here), e.g.::

    evaluate:
      source: models:/losslab-mil@candidate
      split: test                  # val | test | cache
      fold: null                   # must be the source run's validation fold if set (others were trained on)
      cache_dir: null              # split=cache: the other cache
      experiment: null             # default: the source run's experiment, else tracking.experiment
      batch_size: null             # default: the source's data.batch_size
      device: auto
      run_name: null               # default: eval-<loss>-<split>
      rsna_metric: auto            # auto: on for 3 classes with an ordinal loss or the rsna_lumbar source
      allow_pickle: false          # true: also load a pickle-format registered model (runs its code)
      calibration: {enabled: true, threshold_method: youden, objective: balanced_accuracy}
      tta: {enabled: true, passes: 4, seed: 0, augment: {brightness: 0.1, scale: 0.1, prob: 1.0}}
      latency: {enabled: true, warmup: 5, repeats: 30}
      intervals: {enabled: true, n_resamples: 1000, confidence: 0.95, seed: 0}   # patient bootstrap

Logged metrics (one run, tag ``losslab.entry_point=evaluate``): ``test/*`` (the evaluated split,
whatever it is; the tag ``losslab.eval_split`` names it), ``test_calibrated/*`` (temperature + threshold
or per-class logit offsets fitted on the validation split only), ``test_tta/*`` (logits averaged over
the identity pass and ``passes`` augmented passes), ``calibration/*`` (temperature, threshold, and
the before/after gaps ``calibration/gain_balanced_accuracy`` and ``calibration/gain_min_class_recall``
— a collapsed model, e.g. AUC 0.97 with every prediction in one class, shows up as a large gain and as
``test/dead_class_count > 0``), ``test/<metric>_ci_low`` / ``_ci_high`` (95 % percentile intervals
of balanced accuracy, macro F1, AUC and each class's recall, patients resampled with replacement),
with ``rsna_metric``, ``test*/rsna_weighted_log_loss`` and, when the cases carry their study and
condition (the ``rsna_lumbar`` source), the competition's whole score ``test*/rsna_score`` with its
``test*/rsna_any_severe_spinal_log_loss`` term; ``latency/p50_ms``, ``latency/p95_ms`` (batch size 1, after warm-up)
and ``latency/throughput_per_s`` (at the batch size). Artifacts: ``predictions.csv`` (case hash,
patient hash, label, probabilities, prediction, calibrated and TTA predictions), ``calibration.json``,
``evaluate_settings.json``, ``plots/{roc,precision_recall,reliability,confusion_matrix,
confusion_matrix_calibrated}.png``.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlflow
import numpy as np
import pandas as pd
import torch
from pydantic import ValidationError
from losslab.config import (CalibrationConfig, EvaluateConfig, ExperimentConfig, LatencyConfig, TTAConfig,
                            section_dict)
from losslab.data.cache import CacheInfo, load_cache
from losslab.data.splits import TEST_FOLD
from losslab.data.text import index_meta
from losslab.engine.calibration import Calibrator
from losslab.engine.latency import measure_latency
from losslab.engine.loop import resolve_device
from losslab.engine.metrics import (confusion_matrix, dead_class_names, pred_counts, rsna_competition_score,
                                    rsna_weighted_log_loss)
from losslab.pipelines.common import base_tags
from losslab.pipelines.scoring import (LoadedSource, SourceNotFoundError, check_model_fold, check_modalities, load_source,
                                      parse_model_uri, split_metrics)
from losslab.pipelines.train import make_datasets
from losslab.tasks import task_of
from losslab.tracking import log_figure, log_metrics_batch, managed_run, resolve_tracking_uri, setup_tracking

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- settings
CalibrationSettings, TTASettings, LatencySettings = CalibrationConfig, TTAConfig, LatencyConfig


class EvaluateSettings(EvaluateConfig):
    """The ``evaluate:`` section (:class:`losslab.config.EvaluateConfig`) with call overrides on top."""

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, **overrides: Any) -> "EvaluateSettings":
        data = section_dict(cfg.evaluate)
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"evaluate.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"bad evaluate settings: {problems}") from None


# --------------------------------------------------------------------------- data
def _eval_dataset(cfg: ExperimentConfig, info: CacheInfo, rows: pd.DataFrame, normalizer, transform=None):
    """Same construction as training's validation set (the task's evaluation dataset, the training
    normaliser), optionally augmented."""
    return task_of(cfg).make_dataset(cfg, info, rows, train=False, transform=transform, normalizer=normalizer)


def select_datasets(cfg: ExperimentConfig, settings: EvaluateSettings, class_names: list[str],
                    trained_split: str | None = None):
    """``(calibration dataset, evaluated dataset, evaluated cache, evaluated index rows)``.

    The calibration dataset is always the validation split of the fold the model was trained for
    (``cfg.data.fold``, from the source run): it is the evaluated dataset only with ``split=val``
    (in-sample calibration, tagged as such). ``trained_split`` is the split fingerprint the source
    run recorded (tag ``losslab.split_fingerprint``): a cache whose folds differ is refused."""
    fold = model_fold(cfg, settings)
    info = task_of(cfg).load_cache(cfg)
    if trained_split is not None and info.split_fingerprint != trained_split:
        raise ValueError(f"the cache {info.cache_dir} puts cases in other folds than the one the model was trained "
                         f"on (split fingerprint {info.split_fingerprint}, the run's {trained_split}): its "
                         "validation and test cases may be training data; rebuild it with the run's data settings")
    _, val_ds = make_datasets(cfg, info, fold)
    if settings.split == "val":
        return val_ds, val_ds, info, val_ds.index
    if settings.split == "test":
        rows = info.index[info.index["fold"] == TEST_FOLD]
        if len(rows) == 0:
            raise ValueError(f"the cache {info.cache_dir} has no held-out test split (fold {TEST_FOLD}); "
                             "set data.test_fraction > 0 when preprocessing, or use evaluate.split=val")
        eval_info = info
    else:
        if not settings.cache_dir:
            raise ValueError("evaluate.split=cache needs evaluate.cache_dir")
        eval_info = load_cache(settings.cache_dir)
        if eval_info.class_names and list(eval_info.class_names) != list(class_names):
            raise ValueError(f"the cache {settings.cache_dir} has classes {eval_info.class_names}, "
                             f"the model was trained on {class_names}")
        rows = eval_info.index
    return val_ds, _eval_dataset(cfg, eval_info, rows, val_ds.normalizer), eval_info, rows.reset_index(drop=True)


def model_fold(cfg: ExperimentConfig, settings: EvaluateSettings) -> int:
    """The validation fold of the model (``cfg`` is the source run's config); ``evaluate.fold`` may
    only repeat it when it is scored (``split=val``) or calibrated on (:func:`check_model_fold`)."""
    if settings.split == "val" or settings.calibration.enabled:
        return check_model_fold(cfg.data.fold, settings.fold, "scored" if settings.split == "val" else
                                "used for calibration")
    return cfg.data.fold


def _loader(ds, batch_size: int, cfg: ExperimentConfig):
    return task_of(cfg).eval_loader(cfg, ds, batch_size)


# --------------------------------------------------------------------------- numbers
def log_probabilities(probs: np.ndarray) -> np.ndarray:
    """``log p`` ``(N, K)``, clipped away from ``log 0``: the calibrator's input for every loss (for a
    softmax head this differs from the logits by a per-row constant, which softmax ignores)."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-30, None))


def fit_calibrator(val_outputs: dict[str, Any], num_classes: int, settings: CalibrationSettings) -> Calibrator:
    """Temperature and threshold (K = 2) or per-class offsets (K > 2) from validation outputs only."""
    return Calibrator().fit(val_outputs["labels"], log_probabilities(val_outputs["probs"]), num_classes,
                            threshold_method=settings.threshold_method, objective=settings.objective)


def rsna_metrics(outputs: dict[str, Any], prefix: str, rsna: bool,
                 cases: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
    """``<prefix>/rsna_weighted_log_loss`` when asked; with ``cases`` (:func:`rsna_cases` of the
    evaluated index) also the competition's whole score ``<prefix>/rsna_score`` and its
    ``<prefix>/rsna_any_severe_spinal_log_loss`` term (:func:`~losslab.engine.metrics.rsna_competition_score`)."""
    if not rsna:
        return {}
    out = {"rsna_weighted_log_loss": rsna_weighted_log_loss(outputs["labels"], outputs["probs"])}
    if cases is not None:
        order = np.asarray(outputs["index"], dtype=int)
        out |= rsna_competition_score(outputs["labels"], outputs["probs"], cases[0][order], cases[1][order])
    return {f"{prefix}/{k}": v for k, v in out.items()}


def rsna_cases(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    """``(study, condition)`` of every index row (``patient_id`` is the salted study, ``meta.condition``
    the RSNA condition), decoded once per evaluation; None when the rows do not say (not the
    rsna_lumbar source)."""
    if "patient_id" not in rows or "meta" not in rows:
        return None
    conditions = [m.get("condition") for m in index_meta(rows)]
    if not conditions or not all(isinstance(c, str) for c in conditions):
        return None
    return rows["patient_id"].to_numpy(), np.asarray(conditions)


def calibrated_metrics(calibrator: Calibrator, outputs: dict[str, Any], class_names: list[str],
                       prefix: str, rsna: bool, cases: tuple[np.ndarray, np.ndarray] | None = None
                       ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    from losslab.engine.metrics import classification_metrics

    logp = log_probabilities(outputs["probs"])
    probs = calibrator.transform_probs(logp)
    y_pred = calibrator.predict(logp)
    metrics = {f"{prefix}/{k}": float(v)
               for k, v in classification_metrics(outputs["labels"], probs, class_names, y_pred=y_pred).items()}
    return metrics | rsna_metrics(dict(outputs, probs=probs), prefix, rsna, cases), probs, y_pred


def calibration_summary(calibrator: Calibrator, before: dict[str, float], after: dict[str, float],
                        before_prefix: str = "test", after_prefix: str = "test_calibrated") -> dict[str, float]:
    out = {"calibration/temperature": float(calibrator.temperature)}
    if calibrator.threshold is not None:
        out["calibration/threshold"] = float(calibrator.threshold)
    for key in ("balanced_accuracy", "min_class_recall", "f1_macro", "dead_class_count", "ece"):
        b, a = before.get(f"{before_prefix}/{key}"), after.get(f"{after_prefix}/{key}")
        if b is not None and a is not None:
            out[f"calibration/gain_{key}"] = float(a) - float(b)
    return out


def _tta_outputs(model, step, cfg, info, rows, normalizer, loss_fn, device, settings: TTASettings, batch_size: int,
                 plain: dict[str, Any]) -> dict[str, Any]:
    """Logits averaged over the identity pass and ``passes`` augmented passes (seeded)."""
    from losslab.data.transforms import build_transforms

    logits_sum = np.asarray(plain["logits"], dtype=np.float64).copy()
    losses = [plain["loss"]]
    for i in range(settings.passes):
        transform = build_transforms(settings.augment, train=True, seed=settings.seed + i)
        out = step.predict(model, _loader(_eval_dataset(cfg, info, rows, normalizer, transform), batch_size, cfg),
                           device, loss_fn)
        logits_sum += out["logits"]
        losses.append(out["loss"])
    logits = torch.as_tensor(logits_sum / (settings.passes + 1), dtype=torch.float32)
    probs = loss_fn.probabilities(logits) if hasattr(loss_fn, "probabilities") else torch.softmax(logits, 1)
    return {"logits": logits.numpy(), "probs": probs.detach().numpy(), "labels": plain["labels"],
            "index": plain["index"], "loss": float(np.mean(losses))}


def _use_rsna(setting, cfg: ExperimentConfig, loss_fn, num_classes: int) -> bool:
    if setting != "auto":
        return bool(setting)
    ordinal = getattr(loss_fn, "family", "") == "ordinal" or cfg.data.source == "rsna_lumbar"
    return num_classes == 3 and ordinal


# --------------------------------------------------------------------------- the pipeline
@dataclass
class EvaluateResult:
    run_id: str
    metrics: dict[str, float]
    calibrator: Calibrator
    predictions: pd.DataFrame
    tags: dict[str, str]


def _experiment_for(settings: EvaluateSettings, loaded: LoadedSource, cfg: ExperimentConfig) -> None:
    tracking = cfg.tracking
    if settings.experiment:
        setup_tracking(tracking.model_copy(update={"experiment": settings.experiment}))
    elif loaded.experiment_id is not None:
        mlflow.set_experiment(experiment_id=loaded.experiment_id)
    else:
        setup_tracking(tracking)


def run_evaluate(cfg: ExperimentConfig, source: str | None = None, data_overrides: list[str] | None = None,
                 **overrides: Any) -> EvaluateResult:
    """Evaluate ``source`` (or ``cfg.evaluate.source``) and log everything to a new run.

    ``overrides`` are evaluate settings (e.g. ``split="val"``) that win over ``cfg.evaluate``. How the
    model is scored is its own task's (the loaded model's, not the command line config's): the task picks
    one of :data:`SCORERS` (:meth:`losslab.tasks.Task.score_evaluation`; a classifier's per-case scoring
    with calibration, TTA, latency and intervals, else the step's metrics on ``test`` or ``val``) and
    refuses in one line the settings that scoring would drop (:meth:`losslab.tasks.Task.check_evaluate`),
    as :func:`check_applicable` refuses ``data_overrides`` (the command line's ``-o data.*``) for a run or
    a registered version, which is scored on its run's own data settings.
    """
    settings = EvaluateSettings.from_config(cfg, source=source, **overrides)
    if not settings.source:
        raise ValueError("nothing to evaluate: set evaluate.source (models:/name@alias, models:/name/version, "
                         "a run id or a checkpoint file)")
    if settings.split == "cache" and not settings.cache_dir:
        raise ValueError("evaluate.split=cache needs evaluate.cache_dir (--cache-dir): the cache to score")
    if settings.cache_dir and settings.split != "cache":
        raise ValueError(f"evaluate.cache_dir={settings.cache_dir} is read only with evaluate.split=cache "
                         f"(--split cache), not split={settings.split}")
    mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking.tracking_uri))
    loaded = load_source(settings.source, cfg, allow_pickle=settings.allow_pickle)
    check_applicable(loaded, settings, section_dict(cfg.evaluate) | {k: v for k, v in overrides.items()
                                                                     if v is not None}, data_overrides)
    device = resolve_device(settings.device)
    loaded.model.to(device).eval()
    loaded.loss_fn.to(device)
    metrics, artifacts = loaded.task.score_evaluation(SCORERS, loaded, settings, device)
    _experiment_for(settings, loaded, cfg)
    src_cfg = loaded.cfg
    loss_name = loaded.tags.get("losslab.loss", src_cfg.loss.name)
    tags = base_tags(src_cfg, "evaluate") | loaded.tags | {
        "losslab.entry_point": "evaluate", "losslab.loss": loss_name, "losslab.eval_split": settings.split,
        "losslab.class_names": ",".join(loaded.class_names), "losslab.fold": str(src_cfg.data.fold),
        "losslab.calibration_in_sample": str(settings.split == "val" and settings.calibration.enabled).lower()}
    if settings.split == "cache":
        tags["losslab.eval_cache"] = str(Path(settings.cache_dir).resolve())
    dead = dead_class_names(pred_counts(metrics, "test/"))
    if dead:
        log.warning("uncalibrated predictions never name class(es) %s; see test_calibrated/*", ", ".join(dead))
        tags["losslab.dead_classes"] = ",".join(dead)
    run_name = settings.run_name or f"eval-{loss_name}-{settings.split}"
    with managed_run(run_name=run_name, tags=tags, nested=mlflow.active_run() is not None) as run:
        log_metrics_batch(run.info.run_id, metrics, step=0)
        mlflow.log_params({"evaluate.source": settings.source, "evaluate.split": settings.split})
        mlflow.log_dict(settings.model_dump(), "evaluate_settings.json")
        if artifacts is not None:
            _log_case_artifacts(artifacts, loaded)
    return EvaluateResult(run.info.run_id, metrics, artifacts.calibrator if artifacts else Calibrator(),
                          artifacts.predictions if artifacts else pd.DataFrame(), tags)


def check_applicable(loaded: LoadedSource, settings: EvaluateSettings, explicit: dict[str, Any],
                     data_overrides: list[str] | None) -> None:
    """Refuse, in one line, what the loaded model's evaluation would drop: ``data.*`` overrides for a
    run or registered version (scored on its run's ``config.yaml``), and the settings its task's scoring
    does not take (:meth:`losslab.tasks.Task.check_evaluate`)."""
    if data_overrides and loaded.run_id is not None:
        raise ValueError(f"{' '.join(data_overrides)}: {settings.source} is scored on the data settings of its run's "
                         f"config.yaml (run {loaded.run_id}), so -o data.* does not apply; score another cache with "
                         "--split cache --cache-dir, or a checkpoint file with the config it needs")
    loaded.task.check_evaluate(settings.source, settings.split, explicit)


def _score_split(loaded: LoadedSource, settings: EvaluateSettings, device) -> tuple[dict[str, float], None]:
    """``<split>/*`` of the step's metrics on the held-out test cases or the model's own validation fold
    (refused when the cache has no test cases), and the task's summary beside them; no artifacts."""
    cfg, task = loaded.cfg, loaded.task
    info = task.load_cache(cfg)
    check_modalities(loaded, info.report, info.cache_dir)
    if settings.split == "val":
        loader = task.fold_loaders(cfg, info, check_model_fold(cfg.data.fold, settings.fold))[1]
    else:
        loader = task.test_loader(cfg, info)
        if loader is None:
            raise ValueError(f"evaluate.split=test: the cache {info.cache_dir} has no held-out test cases "
                             f"(the run's data.test_fraction={cfg.data.test_fraction}); use --split val")
    outputs = loaded.step.predict(loaded.model, loader, device, loaded.loss_fn, cfg.train.amp)
    return split_metrics(loaded.step, outputs, loaded.class_names, loaded.loss_fn, settings.split) \
        | task.split_summary(outputs, loader.dataset, loaded.class_names, settings.split), None


@dataclass
class _CaseArtifacts:
    outputs: dict[str, Any]
    calibrator: Calibrator
    cal_probs: np.ndarray
    cal_pred: np.ndarray | None
    predictions: pd.DataFrame
    params: dict[str, Any]


def _score_cases(loaded: LoadedSource, settings: EvaluateSettings, device) -> tuple[dict[str, float], _CaseArtifacts]:
    """``test/*`` (the evaluated split, whatever it is) with intervals, ``test_calibrated/*``,
    ``test_tta/*`` and ``latency/*`` of a per-case model, and what its artifacts are written from."""
    src_cfg, class_names, loss_fn, model, step = loaded.cfg, loaded.class_names, loaded.loss_fn, loaded.model, loaded.step
    batch_size = settings.batch_size or src_cfg.data.batch_size
    rsna = _use_rsna(settings.rsna_metric, src_cfg, loss_fn, len(class_names))
    val_ds, eval_ds, eval_info, rows = select_datasets(src_cfg, settings, class_names,
                                                       loaded.tags.get("losslab.source_split_fingerprint"))
    check_modalities(loaded, eval_info.report, eval_info.cache_dir)
    outputs = step.predict(model, _loader(eval_ds, batch_size, src_cfg), device, loss_fn, src_cfg.train.amp)
    cases = rsna_cases(rows) if rsna else None
    metrics = split_metrics(step, outputs, class_names, loss_fn, "test") | rsna_metrics(outputs, "test", rsna, cases) \
        | loaded.task.split_summary(outputs, eval_ds, class_names, "test", settings.intervals)
    calibrator, cal_probs, cal_pred = Calibrator(), outputs["probs"], None
    if settings.calibration.enabled:
        val_outputs = outputs if settings.split == "val" else step.predict(
            model, _loader(val_ds, batch_size, src_cfg), device, loss_fn, src_cfg.train.amp)
        calibrator = fit_calibrator(val_outputs, len(class_names), settings.calibration)
        after, cal_probs, cal_pred = calibrated_metrics(calibrator, outputs, class_names, "test_calibrated", rsna, cases)
        metrics |= after | calibration_summary(calibrator, metrics, after)
    tta_pred = None
    if settings.tta.enabled:
        tta = _tta_outputs(model, step, src_cfg, eval_info, rows, eval_ds.normalizer, loss_fn, device, settings.tta,
                           batch_size, outputs)
        metrics |= split_metrics(step, tta, class_names, loss_fn, "test_tta") | rsna_metrics(tta, "test_tta", rsna, cases)
        tta_pred = loss_fn.predict(torch.as_tensor(tta["logits"])).numpy()
    if settings.latency.enabled:
        metrics |= measure_latency(model, eval_ds, device, batch_size, settings.latency.warmup,
                                   settings.latency.repeats, step=step, collate=loaded.task.collate)
    predictions = _predictions_table(rows, outputs, class_names, loss_fn, cal_pred, tta_pred)
    params = {"evaluate.n_cases": len(rows), "evaluate.batch_size": batch_size}
    return metrics, _CaseArtifacts(outputs, calibrator, cal_probs, cal_pred, predictions, params)


@dataclass(frozen=True)
class Scorers:
    """The two ways ``evaluate`` scores a model; its task picks one (:meth:`losslab.tasks.Task.score_evaluation`)."""

    cases: Callable[..., tuple[dict[str, float], _CaseArtifacts]]
    split: Callable[..., tuple[dict[str, float], None]]


SCORERS = Scorers(cases=_score_cases, split=_score_split)


def _log_case_artifacts(artifacts: _CaseArtifacts, loaded: LoadedSource) -> None:
    """``calibration.json``, ``predictions.csv`` and the plots, to the active run."""
    mlflow.log_params(artifacts.params)
    mlflow.log_dict(artifacts.calibrator.to_dict(), "calibration.json")
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "predictions.csv"
        artifacts.predictions.to_csv(csv_path, index=False)
        mlflow.log_artifact(str(csv_path))
    _log_plots(artifacts.outputs, artifacts.cal_probs, artifacts.cal_pred, loaded.class_names, loaded.loss_fn)


def _predictions_table(rows: pd.DataFrame, outputs, class_names, loss_fn, cal_pred, tta_pred) -> pd.DataFrame:
    order = np.asarray(outputs["index"], dtype=int)
    table = pd.DataFrame({
        "case_id": rows["case_id"].to_numpy()[order],
        "patient_id": rows["patient_id"].to_numpy()[order] if "patient_id" in rows else None,
        "label": outputs["labels"].astype(int),
        "label_name": [class_names[int(y)] for y in outputs["labels"]],
    })
    for c, name in enumerate(class_names):
        table[f"prob_{name}"] = outputs["probs"][:, c]
    table["prediction"] = loss_fn.predict(torch.as_tensor(outputs["logits"])).numpy()
    if cal_pred is not None:
        table["prediction_calibrated"] = cal_pred
    if tta_pred is not None:
        table["prediction_tta"] = tta_pred
    return table


def _log_plots(outputs, cal_probs, cal_pred, class_names, loss_fn) -> None:
    from losslab import plots

    y, probs = outputs["labels"], outputs["probs"]
    y_pred = loss_fn.predict(torch.as_tensor(outputs["logits"])).numpy()
    log_figure(plots.plot_roc(y, probs, class_names), "plots/roc.png")
    log_figure(plots.plot_precision_recall(y, probs, class_names), "plots/precision_recall.png")
    log_figure(plots.plot_reliability(y, probs), "plots/reliability.png")
    log_figure(plots.plot_confusion_matrix(confusion_matrix(y, y_pred, len(class_names)), class_names),
               "plots/confusion_matrix.png")
    if cal_pred is not None:
        log_figure(plots.plot_reliability(y, cal_probs), "plots/reliability_calibrated.png")
        log_figure(plots.plot_confusion_matrix(confusion_matrix(y, cal_pred, len(class_names)), class_names),
                   "plots/confusion_matrix_calibrated.png")


__all__ = ["EvaluateResult", "EvaluateSettings", "LoadedSource", "SourceNotFoundError", "calibrated_metrics",
           "check_applicable",
           "calibration_summary", "fit_calibrator", "load_source", "measure_latency", "parse_model_uri",
           "rsna_cases", "rsna_metrics", "run_evaluate", "select_datasets"]
