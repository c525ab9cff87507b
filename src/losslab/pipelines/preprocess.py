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
    """Build (or reuse) the cache for ``cfg.data``; log counts, report and dataset to MLflow."""
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
