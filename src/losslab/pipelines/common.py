"""Helpers shared by the pipelines (the only layer that opens MLflow runs)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import mlflow

from losslab.likeness import config_hash
from losslab.tracking import config_params, managed_run

PROJECT_RUN_ENV = "MLFLOW_RUN_ID"


@contextlib.contextmanager
def entry_point_run(entry_point: str) -> Iterator[str | None]:
    """Under ``mlflow run``, MLflow creates a run and passes it in ``$MLFLOW_RUN_ID``.

    We adopt that run as the parent of the runs this entry point opens (so ``mlflow run`` shows one
    parent with its preprocess/train children) and remove the variable so that our own
    ``start_run`` calls create new runs. Outside ``mlflow run`` this does nothing.
    """
    run_id = os.environ.pop(PROJECT_RUN_ENV, None)
    if run_id is None:
        yield None
        return
    with managed_run(run_id=run_id) as run:
        mlflow.set_tag("losslab.entry_point", entry_point)
        yield run.info.run_id


def base_tags(cfg, entry_point: str, fold: int | None = None) -> dict[str, str]:
    tags = {
        "losslab.entry_point": entry_point,
        "losslab.loss": cfg.loss.name,
        "losslab.dataset": cfg.data.source,
        "losslab.model": f"{cfg.model.kind}:{cfg.model.backbone}:{cfg.model.head}",
        # the config minus fold, seed and bookkeeping (losslab.likeness): equal across one experiment's folds
        "losslab.config_hash": config_hash(config_params(cfg)),
    }
    if fold is not None:
        tags["losslab.fold"] = str(fold)
    return tags
