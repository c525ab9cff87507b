"""evaluate (segmentation): score a registered segmentation model on its validation fold or on the
held-out test patients.

``source`` is ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or a run id. A registered model
is loaded by :func:`losslab.pipelines.registry.load_registered_model` (safetensors + spec, rebuilt by
our builders; a pickle-format model only with ``evaluate.allow_pickle``); a run id is rebuilt from the
run's ``config.yaml`` with its ``checkpoints/best.pt`` (``weights_only``). The data and fold come from
the source run's ``config.yaml``. ``evaluate.split`` (``--split``): ``test`` (default) scores the
held-out test patients (fold -1) as ``test/*`` and is refused when the cache has none; ``val`` scores
the model's own validation fold as ``val/*`` (``evaluate.fold`` may only repeat it: every other fold
was trained on). The model is scored by the training code path (sliding windows, ``DiceMetric``,
``HausdorffDistanceMetric``), so ``val/mean_dice`` reproduces the run's ``best_val/mean_dice`` and
``test/mean_dice`` its ``test/mean_dice``. Metrics go to a new run tagged ``losslab.entry_point=evaluate``
and ``losslab.split``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from losslab.config import ExperimentConfig, section_dict
from losslab.engine.loop import evaluation_weights, load_checkpoint, resolve_device
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
        return evaluation_weights(load_checkpoint(path))


def _seg_loader(info, run_cfg: ExperimentConfig, split: str, fold: int | None):
    """The loader of ``split`` for the model of ``run_cfg``; refuses what it cannot score honestly."""
    from losslab.data.seg_datasets import make_seg_loaders, make_seg_test_loader

    own = run_cfg.data.fold
    if fold is not None and int(fold) != own:
        raise ValueError(f"evaluate.fold={fold}: the model trained on fold {fold} (its validation fold is {own}), "
                         f"so it cannot be scored there; leave evaluate.fold unset or set it to {own}")
    if split == "val":
        return make_seg_loaders(info, own, run_cfg.seg, run_cfg.model.spatial_dims, 1)[1]
    if split == "test":
        loader = make_seg_test_loader(info)
        if loader is None:
            raise ValueError(f"evaluate.split=test: the segmentation cache {info.cache_dir} has no held-out test "
                             f"patients (the run's data.test_fraction={run_cfg.data.test_fraction}); use --split val")
        return loader
    raise ValueError(f"evaluate.split={split!r} is not available for segmentation models; use test or val")


def run_seg_evaluate(cfg: ExperimentConfig, source: str | None = None, fold: int | None = None,
                     split: str | None = None) -> SegEvaluateResult:
    """Score the segmentation model ``source`` (default ``evaluate.source``) on ``split`` (default
    ``evaluate.split``) and log ``<split>/*`` metrics to a new run."""
    from losslab.data.seg_cache import build_seg_cache
    from losslab.pipelines.evaluate import _run_config
    from losslab.pipelines.seg_train import build_seg_task, split_metrics

    settings = section_dict(cfg.evaluate)
    source = source or settings.get("source")
    split = split or settings.get("split") or "test"
    if not source:
        raise ValueError("nothing to evaluate: pass --model models:/<name>@<alias> (or set evaluate.source)")
    mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking.tracking_uri))
    run_id, tags = _source_run(source)
    run_cfg = _run_config(run_id)
    fold = fold if fold is not None else settings.get("fold")
    info = build_seg_cache(run_cfg.data, run_cfg.seg)
    loader = _seg_loader(info, run_cfg, split, fold)  # refused before the model is loaded or a run opens
    task, model = build_seg_task(run_cfg, info.channel_names)
    if source.startswith("models:/"):
        from losslab.pipelines.registry import load_registered_model

        model = load_registered_model(source, allow_pickle=bool(settings.get("allow_pickle", False))).model
    else:
        model.load_state_dict(_load_weights(run_id))
    device = resolve_device(run_cfg.train.device)
    metrics = split_metrics(task, model.to(device), loader, device, run_cfg.train.amp, split)
    experiment = MlflowClient().get_run(run_id).info.experiment_id
    mlflow.set_experiment(experiment_id=experiment)
    tags |= {"losslab.entry_point": "evaluate", "losslab.task": "segmentation", "losslab.loss": run_cfg.loss.name,
             "losslab.fold": str(run_cfg.data.fold), "losslab.split": split, "losslab.dataset": run_cfg.data.source}
    with managed_run(run_name=f"evaluate-{run_cfg.loss.name}-f{run_cfg.data.fold}-{split}", tags=tags,
                     nested=mlflow.active_run() is not None) as run:
        mlflow.log_metrics(metrics)
        return SegEvaluateResult(run.info.run_id, metrics, tags)
