"""Reading a distill invocation back from MLflow: one row per run (teacher, each student, student alone)."""

from __future__ import annotations

from typing import Any

import pandas as pd

ROLE_ORDER = {"teacher": 0, "student": 1, "student_alone": 2}
#: split -> the metric prefix its scores are logged under: ``test`` the held-out test split (fold −1),
#: ``val`` the validation split that picked each run's best epoch (its ``best_val/*``)
SPLIT_PREFIX = {"test": "test/", "val": "best_val/"}


def distillation_table(experiment_name: str, parent_run_id: str | None = None, split: str | None = None) -> pd.DataFrame:
    """One row per run of a distill invocation: the teacher, each student loss, the student alone.

    Columns: ``loss`` (``teacher``, the loss name, ``none``), ``role``, then per task
    ``<task>/accuracy``, ``<task>/f1_macro``, ``<task>/auc`` on ``split``, ``latency/p50_ms``,
    ``split`` and ``run_id``. Rows: teacher first, then the students in run order, then the student alone.

    Args:
        experiment_name: the MLflow experiment (``tracking.experiment``).
        parent_run_id: the ``distill`` parent run; default the most recent one in the experiment.
        split: ``test`` (the held-out test split, ``test/*``), ``val`` (the validation split that picked
            the best epochs, ``best_val/*``) or None: ``test`` when every run was scored on a test split,
            else ``val`` (a cache without ``data.test_fraction``).

    Raises:
        ValueError: no such experiment, no distill run in it, an unknown ``split``, or ``split="test"``
            for runs without test scores.
    """
    from mlflow.tracking import MlflowClient

    if split is not None and split not in SPLIT_PREFIX:
        raise ValueError(f"split={split!r}: expected one of {sorted(SPLIT_PREFIX)}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise ValueError(f"no MLflow experiment named {experiment_name!r}")
    parent_run_id = parent_run_id or _latest_parent(client, experiment)
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                  order_by=["attributes.start_time ASC"], max_results=1000)
    children = [r for r in children if r.data.tags.get("losslab.role") in ROLE_ORDER]
    children.sort(key=lambda r: (ROLE_ORDER[r.data.tags["losslab.role"]], r.info.start_time))
    tested = bool(children) and all(any(k.startswith("test/") for k in r.data.metrics) for r in children)
    split = split or ("test" if tested else "val")
    if split == "test" and not tested:
        raise ValueError(f"the runs of distill run {parent_run_id} have no test/* scores (a cache without a held-out "
                         "test split: data.test_fraction=0); read their validation scores with split='val'")
    prefix = SPLIT_PREFIX[split]
    tasks: list[str] = []
    for r in children:
        for k in r.data.metrics:
            if k.startswith(prefix) and k.endswith("/accuracy") and k.count("/") == 2:
                task = k.split("/")[1]
                if task not in tasks:
                    tasks.append(task)
    rows = [_row(r, tasks, prefix, split) for r in children]
    columns = ["loss", "role"] + [f"{t}/{k}" for t in tasks for k in ("accuracy", "f1_macro", "auc")] \
        + ["latency/p50_ms", "split", "run_id"]
    return pd.DataFrame(rows, columns=columns)


def _latest_parent(client: Any, experiment: Any) -> str:
    parents = client.search_runs([experiment.experiment_id], "tags.`losslab.distill_parent` = 'true'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise ValueError(f"experiment {experiment.name!r} has no distill run")
    return parents[0].info.run_id


def _row(run: Any, tasks: list[str], prefix: str, split: str) -> dict[str, Any]:
    row: dict[str, Any] = {"loss": run.data.tags.get("losslab.loss", ""), "role": run.data.tags["losslab.role"]}
    for task in tasks:
        for key in ("accuracy", "f1_macro", "auc"):
            row[f"{task}/{key}"] = run.data.metrics.get(f"{prefix}{task}/{key}", float("nan"))
    row["latency/p50_ms"] = run.data.metrics.get("latency/p50_ms", float("nan"))
    return row | {"split": split, "run_id": run.info.run_id}
