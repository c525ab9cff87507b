"""evaluate (segmentation): score a registered segmentation model on its validation fold.

``source`` is ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or a run id. A registered model
is loaded by :func:`losslab.pipelines.registry.load_registered_model` (safetensors + spec, rebuilt by
our builders; a pickle-format model only with ``evaluate.allow_pickle``); a run id is rebuilt from the
run's ``config.yaml`` with its ``checkpoints/best.pt`` (``weights_only``). The data and fold come from
the source run's ``config.yaml`` (``fold`` overrides the fold). The model is validated by the training
code path (sliding windows, ``DiceMetric``, ``HausdorffDistanceMetric``), so ``val/mean_dice``
reproduces the run's ``best_val/mean_dice``. Metrics go to a new run tagged
``losslab.entry_point=evaluate``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from losslab.config import ExperimentConfig, section_dict
from losslab.engine.loop import load_checkpoint, resolve_device
from losslab.tracking import managed_run, resolve_tracking_uri


@dataclass
class SegEvaluateResult:
    run_id: str
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)


def _source_run(source: str) -> tuple[str, dict[str, str]]:
    """The run id behind ``source`` and provenance tags (SourceNotFoundError when missing)."""
    from losslab.pipelines.evaluate import _client_call, parse_model_uri

    client = MlflowClient()
    if not source.startswith("models:/"):
        run_id = source[len("runs:/"):].strip("/").split("/")[0] if source.startswith("runs:/") else source
        _client_call(f"run {run_id}", client.get_run, run_id)
        return run_id, {"losslab.source_run_id": run_id}
    name, alias, version = parse_model_uri(source)
    if alias is not None:
        mv = _client_call(f"alias {alias!r} of registered model {name!r}", client.get_model_version_by_alias, name, alias)
    else:
        mv = _client_call(f"version {version} of registered model {name!r}", client.get_model_version, name, version)
    return mv.run_id, {"losslab.source_model": source, "losslab.source_model_version": f"{mv.version}",
                       "losslab.source_run_id": mv.run_id}


def _load_weights(run_id: str) -> dict[str, Any]:
    from losslab.pipelines.evaluate import SourceNotFoundError

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/best.pt", dst_path=tmp)
        except (MlflowException, OSError) as exc:
            raise SourceNotFoundError(f"run {run_id} has no checkpoints/best.pt artifact: {exc}") from None
        return load_checkpoint(path)["model"]


def run_seg_evaluate(cfg: ExperimentConfig, source: str | None = None, fold: int | None = None) -> SegEvaluateResult:
    """Validate the segmentation model ``source`` (default ``evaluate.source``) and log ``val/*`` metrics."""
    from losslab.data.seg_cache import build_seg_cache
    from losslab.data.seg_datasets import make_seg_loaders
    from losslab.pipelines.evaluate import _run_config
    from losslab.pipelines.seg_train import build_seg_task

    source = source or section_dict(cfg.evaluate).get("source")
    if not source:
        raise ValueError("nothing to evaluate: pass --model models:/<name>@<alias> (or set evaluate.source)")
    mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking.tracking_uri))
    run_id, tags = _source_run(source)
    run_cfg = _run_config(run_id)
    fold = run_cfg.data.fold if fold is None else int(fold)
    info = build_seg_cache(run_cfg.data, run_cfg.seg)
    task, model = build_seg_task(run_cfg, info.channel_names)
    if source.startswith("models:/"):
        from losslab.pipelines.registry import load_registered_model

        allow_pickle = bool(section_dict(cfg.evaluate).get("allow_pickle", False))
        model = load_registered_model(source, allow_pickle=allow_pickle).model
    else:
        model.load_state_dict(_load_weights(run_id))
    _, val_loader = make_seg_loaders(info, fold, run_cfg.seg, run_cfg.model.spatial_dims, 1)
    device = resolve_device(run_cfg.train.device)
    metrics, _ = task.validate(model.to(device), val_loader, device, run_cfg.train.amp)
    experiment = MlflowClient().get_run(run_id).info.experiment_id
    mlflow.set_experiment(experiment_id=experiment)
    tags |= {"losslab.entry_point": "evaluate", "losslab.task": "segmentation", "losslab.loss": run_cfg.loss.name,
             "losslab.fold": str(fold), "losslab.dataset": run_cfg.data.source}
    with managed_run(run_name=f"evaluate-{run_cfg.loss.name}-f{fold}", tags=tags,
                     nested=mlflow.active_run() is not None) as run:
        mlflow.log_metrics(metrics)
        return SegEvaluateResult(run.info.run_id, metrics, tags)
