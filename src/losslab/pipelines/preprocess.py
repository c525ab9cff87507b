"""preprocess: raw data -> case cache (arrays + index + report), logged to MLflow."""

from __future__ import annotations

import logging

import mlflow

from losslab.config import ExperimentConfig
from losslab.data.cache import CacheInfo, build_cache
from losslab.pipelines.common import base_tags
from losslab.tracking import log_config, managed_run, setup_tracking

log = logging.getLogger(__name__)


def run_preprocess(cfg: ExperimentConfig, force: bool = False, log_to_mlflow: bool = True) -> CacheInfo:
    """Build (or reuse) the cache for ``cfg.data``; log counts, report and dataset to MLflow.
    ``model.kind: segmentation`` builds the segmentation cache (:func:`run_seg_preprocess`)."""
    if cfg.model.kind == "segmentation":
        return run_seg_preprocess(cfg, force, log_to_mlflow)
    if not log_to_mlflow:
        return build_cache(cfg.data, force=force)
    setup_tracking(cfg.tracking)
    tags = base_tags(cfg, "preprocess")
    tags.pop("losslab.loss")
    tags.pop("losslab.model")
    with managed_run(run_name=f"preprocess-{cfg.data.source}", tags=tags, nested=mlflow.active_run() is not None):
        info = build_cache(cfg.data, force=force)
        msg = ("reused the cache at %s (inputs unchanged, fingerprint %s)" if info.reused
               else "wrote the cache at %s (fingerprint %s)")
        if info.resumed_tasks:
            msg += f"; resumed an interrupted build: {info.resumed_tasks} of {info.total_tasks} tasks were done"
        log.info(msg, info.cache_dir, info.fingerprint[:12])
        print(msg % (info.cache_dir, info.fingerprint[:12]))
        mlflow.log_params({"data.source": cfg.data.source, "data.root": cfg.data.root,
                           "data.cache_dir": str(cfg.data.cache_dir), "data.num_folds": cfg.data.num_folds,
                           "data.test_fraction": cfg.data.test_fraction,
                           "data.cache_dtype": cfg.data.cache_dtype})
        mlflow.set_tag("losslab.cache_reused", str(info.reused).lower())
        counts = info.report.get("class_counts", {})
        metrics = {"cases": float(len(info.index)), "skipped": float(info.report.get("skipped_count", 0)),
                   "resumed_tasks": float(info.resumed_tasks)}
        metrics.update({f"class_count_{k}": float(v) for k, v in counts.items()})
        mlflow.log_metrics(metrics)
        mlflow.log_dict(info.report, "report.json")
        index_view = info.index[["case_id", "patient_id", "label", "class_name", "fold", "split", "n_instances"]]
        dataset = mlflow.data.from_pandas(index_view, source=str(info.cache_dir), name=f"{cfg.data.source}-cache",
                                          targets="label", digest=info.fingerprint[:16])
        mlflow.log_input(dataset, context="preprocess")
        with_config = cfg
        log_config(with_config)
    return info


def run_seg_preprocess(cfg: ExperimentConfig, force: bool = False, log_to_mlflow: bool = True):
    """The segmentation cache (volumes, targets, distance maps, spacing); its report logged to MLflow."""
    from losslab.data.seg_cache import build_seg_cache

    if not log_to_mlflow:
        return build_seg_cache(cfg.data, cfg.seg, force=force)
    setup_tracking(cfg.tracking)
    tags = base_tags(cfg, "preprocess") | {"losslab.task": "segmentation"}
    tags.pop("losslab.loss")
    with managed_run(run_name=f"preprocess-{cfg.data.source}-seg", tags=tags, nested=mlflow.active_run() is not None):
        info = build_seg_cache(cfg.data, cfg.seg, force=force)
        print(f"{'reused' if info.reused else 'wrote'} the segmentation cache at {info.cache_dir} "
              f"(fingerprint {info.fingerprint[:12]})")
        for skipped in info.report["skipped"]:
            print(f"skipped {skipped['item']}: {skipped['reason']}")
        for note in info.report["notes"]:
            print(f"note: {note}")
        mlflow.set_tag("losslab.cache_reused", str(info.reused).lower())
        mlflow.log_metrics({"cases": float(len(info.index)), "skipped": float(info.report.get("skipped_count", 0))})
        mlflow.log_dict(info.report, "report.json")
        log_config(cfg)
    return info
