"""Resuming a distill invocation: the child runs of a stopped or killed distill parent, by label."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from losslab.pipelines.distill_tables import ROLE_ORDER


@dataclass
class PreviousRuns:
    """The child runs of a resumed distill parent, by label (``teacher``, a loss name, ``none``), and
    extra engine callbacks (tests)."""

    runs: dict[str, Any] = field(default_factory=dict)
    callbacks: list = field(default_factory=list)

    def finished(self, label: str):
        run = self.runs.get(label)
        return run if run is not None and run.info.status == "FINISHED" else None

    def unfinished_id(self, label: str) -> str | None:
        run = self.runs.get(label)
        return run.info.run_id if run is not None and run.info.status != "FINISHED" else None


def previous_runs(parent_id: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    parent = client.get_run(parent_id)
    if parent.data.tags.get("losslab.distill_parent") != "true":
        raise ValueError(f"--resume {parent_id}: not a distill run (resume the distill parent run)")
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                  max_results=1000)
    out: dict[str, Any] = {}
    for run in sorted(children, key=lambda r: r.info.start_time):  # the latest run of a label wins
        role = run.data.tags.get("losslab.role")
        if role in ROLE_ORDER:
            out["teacher" if role == "teacher" else run.data.tags.get("losslab.loss", "")] = run
    return out
