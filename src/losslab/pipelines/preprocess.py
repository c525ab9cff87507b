"""preprocess: raw data -> case cache (arrays + index + report), logged to MLflow."""

from __future__ import annotations

import logging

import mlflow

from losslab.config import ExperimentConfig
from losslab.data.cache import CacheInfo
from losslab.pipelines.common import base_tags
from losslab.tasks import task_of
from losslab.tracking import log_config, managed_run, setup_tracking

log = logging.getLogger(__name__)


def run_preprocess(cfg: ExperimentConfig, force: bool = False, log_to_mlflow: bool = True) -> CacheInfo:
    """Build (or reuse) the task's cache for ``cfg.data`` (:meth:`losslab.tasks.Task.build_cache`); log
    its counts, report and, for a tabular index, the dataset to MLflow."""
    task = task_of(cfg)
    if not log_to_mlflow:
        return task.build_cache(cfg, force=force)
    setup_tracking(cfg.tracking)
    tags = base_tags(cfg, "preprocess") | {"losslab.task": task.name}
    tags.pop("losslab.loss")
    tags.pop("losslab.model")
    with managed_run(run_name=f"preprocess-{cfg.data.source}", tags=tags, nested=mlflow.active_run() is not None):
        info = task.build_cache(cfg, force=force)
        lines, metrics = task.cache_summary(info)
        for line in lines:
            log.info(line)
            print(line)
        mlflow.log_params({"data.source": cfg.data.source, "data.root": cfg.data.root,
                           "data.cache_dir": str(cfg.data.cache_dir), "data.num_folds": cfg.data.num_folds,
                           "data.test_fraction": cfg.data.test_fraction,
                           "data.cache_dtype": cfg.data.cache_dtype})
        mlflow.set_tag("losslab.cache_reused", str(info.reused).lower())
        mlflow.log_metrics({"cases": float(len(info.index)), "skipped": float(info.report.get("skipped_count", 0))}
                           | metrics)
        mlflow.log_dict(info.report, "report.json")
        table = task.dataset_input(info)
        if table is not None:  # the cases as an MLflow dataset input
            index_view, targets = table
            dataset = mlflow.data.from_pandas(index_view, source=str(info.cache_dir), name=f"{cfg.data.source}-cache",
                                              targets=targets, digest=info.fingerprint[:16])
            mlflow.log_input(dataset, context="preprocess")
        log_config(cfg)
    return info
