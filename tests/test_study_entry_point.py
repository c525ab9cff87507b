"""`mlflow run . -e study -P study=configs/study/demo.yaml` runs the demo study through the MLproject
entry point (only the data, model size and epochs shortened through its `overrides` parameter): the run
`mlflow run` opened becomes the study's parent, with every cell under it and study.md on it."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from _study import small_overrides

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(1800)
def test_mlflow_run_entry_point_runs_the_demo_study(embedded_root, small_cache, tmp_path):
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [o for o in small_overrides(embedded_root, small_cache, tmp_path, "study-entry-point")
                 if not o.startswith("data.cache_dir")] + [f"data.cache_dir={tmp_path / 'cache'}"]  # the demo's own split
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {
        "MLFLOW_TRACKING_URI": store, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(Path(bin_dir) / "mlflow"), "run", ".", "-e", "study", "--env-manager", "local",
                           "-P", "study=configs/study/demo.yaml", "-P", f"overrides={shlex.join(overrides)}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1700)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "study demo: complete; 6 cell(s) in the tables" in proc.stdout
    assert "  focal − ce on best_val/balanced_accuracy: " in proc.stdout

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("study-entry-point")
    runs = client.search_runs([exp.experiment_id], "tags.`losslab.study` = 'demo'")
    (parent,) = [r for r in runs if r.data.tags["losslab.study_role"] == "parent"]
    cells = [r for r in runs if r.data.tags["losslab.study_role"] == "cell"]
    assert parent.data.tags["losslab.entry_point"] == "study" and "mlflow.project.entryPoint" in parent.data.tags
    assert sorted(r.data.tags["losslab.cell"] for r in cells if r.info.status == "FINISHED") == \
        sorted(f"{v}|f{f}|s0" for v in ("ce", "focal") for f in (0, 1, 2))
    assert {r.data.tags["mlflow.parentRunId"] for r in cells} == {parent.info.run_id}
    assert {"study.md", "study_table.csv"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.tags["mlflow.note.content"].startswith("# Study `demo`")
