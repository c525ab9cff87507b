"""Helpers shared by the pipelines (the only layer that opens MLflow runs)."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

import mlflow
from mlflow.tracking import MlflowClient

from losslab.likeness import config_hash
from losslab.tracking import config_params, managed_run, setup_tracking

log = logging.getLogger(__name__)
PROJECT_RUN_ENV = "MLFLOW_RUN_ID"
DEFAULT_EXPERIMENT_ID = "0"  # where `mlflow run` puts its run when given no experiment


@contextlib.contextmanager
def entry_point_run(entry_point: str, tracking: Any = None) -> Iterator[str | None]:
    """Under ``mlflow run``, MLflow creates a run and passes it in ``$MLFLOW_RUN_ID``.

    We adopt that run as the parent of the runs this entry point opens (so ``mlflow run`` shows one
    parent with its preprocess/train children) and remove the variable so that our own
    ``start_run`` calls create new runs. Outside ``mlflow run`` this does nothing.

    ``tracking`` (the config's ``tracking`` section): the parent belongs in the same experiment as
    its children. When ``mlflow run`` was given no experiment it creates its run in ``Default``;
    the entry point then continues as a new run (same name, tags and params) in the config's
    experiment, which holds the children, and the ``Default`` run only points to it (tag
    ``losslab.continued_as`` and its description; ``mlflow run`` still ends it with the command's
    outcome, and it cannot be deleted: ``mlflow run`` would fail setting its status). An experiment
    chosen on the ``mlflow run`` command line is kept, with a warning when it differs.
    """
    run_id = os.environ.pop(PROJECT_RUN_ENV, None)
    if run_id is None:
        yield None
        return
    if tracking is not None:
        run_id = _in_config_experiment(run_id, tracking)
    with managed_run(run_id=run_id) as run:
        mlflow.set_tag("losslab.entry_point", entry_point)
        yield run.info.run_id


def _in_config_experiment(run_id: str, tracking: Any) -> str:
    """The id of the parent run to adopt: ``run_id``, or its continuation in the config's experiment."""
    from mlflow.entities import Param

    from losslab.redaction import redact_text

    exp_id = setup_tracking(tracking)
    client = MlflowClient()
    launcher = client.get_run(run_id)
    if launcher.info.experiment_id == exp_id:
        return run_id
    if launcher.info.experiment_id != DEFAULT_EXPERIMENT_ID:
        chosen = client.get_experiment(launcher.info.experiment_id).name
        log.warning("mlflow run put its run in experiment %r (command line); this entry point's runs go to the "
                    "config's experiment %r (set tracking.experiment=%s to keep them together)",
                    chosen, tracking.experiment, chosen)
        return run_id
    tags = {k: v for k, v in launcher.data.tags.items() if k != "mlflow.runName"}
    run = client.create_run(exp_id, run_name=launcher.info.run_name, tags=tags)
    params = [Param(k, redact_text(v)) for k, v in launcher.data.params.items()]  # e.g. a password in `overrides`
    for i in range(0, len(params), 90):
        client.log_batch(run.info.run_id, params=params[i : i + 90])
    client.set_tag(run_id, "losslab.continued_as", run.info.run_id)
    client.set_tag(run_id, "mlflow.note.content", f"Continued as run {run.info.run_id} in experiment "
                                                  f"'{tracking.experiment}' (the experiment of the config).")
    log.info("mlflow run started run %s in the Default experiment; continuing as run %s in experiment %r",
             run_id, run.info.run_id, tracking.experiment)
    return run.info.run_id


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
