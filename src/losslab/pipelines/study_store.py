"""A study's runs in the MLflow store: the tags that say which cell a run is, and the cells read back.

Every run of a study carries ``losslab.study`` (the study's name) and ``losslab.study_role``
(``parent``, ``cell`` for a cell's train run, ``evaluate`` for its evaluate run); cell runs also carry
``losslab.variant``, ``losslab.cell`` (``<variant>|f<fold>|s<seed>``), ``losslab.cell_config`` (the
fingerprint of the cell's config, :func:`losslab.likeness.config_hash`) besides train's own
``losslab.fold``, ``losslab.seed`` and ``losslab.split_fingerprint``. Tables and looks read only
FINISHED runs, one per cell (the newest, should there ever be two).
"""

from __future__ import annotations

import math

import pandas as pd
from mlflow.tracking import MlflowClient

from losslab.config.study import StudyConfig
from losslab.tracking import STUDY_TAG

ROLE_TAG = "losslab.study_role"
VARIANT_TAG = "losslab.variant"
CELL_TAG = "losslab.cell"
CELL_CONFIG_TAG = "losslab.cell_config"
TRAIN_RUN_TAG = "losslab.train_run"
PARENT_ATTR = "mlflow_parent_run_id"  # the Optuna study's user attribute naming the parent run
FRAME_COLUMNS = ["variant", "fold", "seed", "cell", "run_id", "eval_run_id", "test_train_ratio"]


def search(experiment_id: str, name: str, role: str, extra: str = "", status: str | None = "FINISHED") -> list:
    """The runs of study ``name`` with ``role`` (and the ``extra`` filter), oldest first, every page."""
    client = MlflowClient()
    query = f"tags.`{STUDY_TAG}` = '{name}' and tags.`{ROLE_TAG}` = '{role}'" + (f" and {extra}" if extra else "")
    if status:
        query += f" and attributes.status = '{status}'"
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def cell_filter(key: str) -> str:
    return f"tags.`{CELL_TAG}` = '{key}'"


def _newest_per_cell(runs: list) -> dict[str, object]:
    return {r.data.tags[CELL_TAG]: r for r in runs}  # oldest first: the newest wins


def _ratio(spec: StudyConfig, params: dict[str, str]) -> float:
    """``n_test/n_train`` (``n_val`` when scored on validation, or without a test count) of a cell."""
    if len(spec.fold_list) == 1:
        return 0.0
    n_train = float(params.get("data.n_train", "nan"))
    n_eval = float(params.get("data.n_val", "nan"))
    if spec.split != "val" and float(params.get("data.n_test", "0") or 0) > 0:
        n_eval = float(params["data.n_test"])
    return n_eval / n_train if n_train > 0 else math.nan


def _row(spec: StudyConfig, run, evaluated) -> dict:
    tags = run.data.tags
    row = {"variant": tags[VARIANT_TAG], "fold": int(tags["losslab.fold"]), "seed": int(tags["losslab.seed"]),
           "cell": tags[CELL_TAG], "run_id": run.info.run_id, "eval_run_id": evaluated.info.run_id if evaluated else None,
           "test_train_ratio": _ratio(spec, run.data.params)}
    for metric in spec.metrics:
        key = metric.key(spec.split)
        source = evaluated.data.metrics if evaluated is not None else {}
        if not key.startswith("test_calibrated/"):
            source = {**source, **run.data.metrics}  # train's own scores first
        row[key] = float(source.get(key, math.nan))
    return row


def cells_frame(spec: StudyConfig, experiment_id: str) -> pd.DataFrame:
    """One row per finished cell of the study file's variants, folds and seeds: ``variant, fold, seed, cell,
    run_id, eval_run_id, test_train_ratio`` and each study metric (a ``test_calibrated/*`` metric from the cell's evaluate run; when evaluate
    runs are asked for, a cell counts once its evaluate run is finished)."""
    trains = _newest_per_cell(search(experiment_id, spec.name, "cell"))
    evals = _newest_per_cell(search(experiment_id, spec.name, "evaluate")) if spec.needs_evaluate else {}
    rows = [_row(spec, run, evals.get(key)) for key, run in trains.items()
            if not spec.needs_evaluate or key in evals]
    # only the cells of this study file (a study re-run with fewer variants, folds or seeds keeps its runs)
    rows = [r for r in rows if r["variant"] in spec.variants and r["fold"] in spec.fold_list
            and r["seed"] in spec.all_seeds]
    keys = [m.key(spec.split) for m in spec.metrics]
    return pd.DataFrame(rows, columns=FRAME_COLUMNS + [k for k in keys if k not in FRAME_COLUMNS])


__all__ = ["CELL_CONFIG_TAG", "CELL_TAG", "FRAME_COLUMNS", "PARENT_ATTR", "ROLE_TAG", "TRAIN_RUN_TAG", "VARIANT_TAG",
           "cell_filter", "cells_frame", "search"]
