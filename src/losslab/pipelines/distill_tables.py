"""Reading a distill invocation back from MLflow: one row per run (teacher, each student, student alone)."""

from __future__ import annotations

from typing import Any

import pandas as pd

ROLE_ORDER = {"teacher": 0, "student": 1, "student_alone": 2}


def distillation_table(experiment_name: str, parent_run_id: str | None = None) -> pd.DataFrame:
    """One row per run of a distill invocation: the teacher, each student loss, the student alone.

    Columns: ``loss`` (``teacher``, the loss name, ``none``), ``role``, then per task
    ``<task>/accuracy``, ``<task>/f1_macro``, ``<task>/auc`` (the runs' ``best_val/<task>/…``
    metrics), ``latency/p50_ms`` and ``run_id``. Rows: teacher first, then the students in
    run order, then the student alone.

    Args:
        experiment_name: the MLflow experiment (``tracking.experiment``).
        parent_run_id: the ``distill`` parent run; default the most recent one in the experiment.

    Raises:
        ValueError: no such experiment, or no distill run in it.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise ValueError(f"no MLflow experiment named {experiment_name!r}")
    if parent_run_id is None:
        parents = client.search_runs([experiment.experiment_id],
                                     "tags.`losslab.distill_parent` = 'true'", order_by=["attributes.start_time DESC"],
                                     max_results=1)
        if not parents:
            raise ValueError(f"experiment {experiment_name!r} has no distill run")
        parent_run_id = parents[0].info.run_id
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                  order_by=["attributes.start_time ASC"], max_results=1000)
    children = [r for r in children if r.data.tags.get("losslab.role") in ROLE_ORDER]
    children.sort(key=lambda r: (ROLE_ORDER[r.data.tags["losslab.role"]], r.info.start_time))
    tasks: list[str] = []
    for r in children:
        for k in r.data.metrics:
            if k.startswith("best_val/") and k.endswith("/accuracy") and k.count("/") == 2:
                task = k.split("/")[1]
                if task not in tasks:
                    tasks.append(task)
    rows = []
    for r in children:
        row: dict[str, Any] = {"loss": r.data.tags.get("losslab.loss", ""), "role": r.data.tags["losslab.role"]}
        for task in tasks:
            for key in ("accuracy", "f1_macro", "auc"):
                row[f"{task}/{key}"] = r.data.metrics.get(f"best_val/{task}/{key}", float("nan"))
        row["latency/p50_ms"] = r.data.metrics.get("latency/p50_ms", float("nan"))
        row["run_id"] = r.info.run_id
        rows.append(row)
    columns = ["loss", "role"] + [f"{t}/{k}" for t in tasks for k in ("accuracy", "f1_macro", "auc")] \
        + ["latency/p50_ms", "run_id"]
    return pd.DataFrame(rows, columns=columns)
