"""A study scaled out for real: a throw-away PostgreSQL cluster holds the Optuna storage and an MLflow
server's store; two workers run `losslab study` as separate processes in separate working folders (each
builds its own cache from the raw data), as two machines would. The cells split between them, the
splits are the same, and there is one parent run with one table."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import optuna
import pandas as pd
import pytest
import yaml

import _pg
from _study import small_overrides
from losslab.pipelines.study_worker import STORAGE_ENV

_REASON = _pg.unavailable_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_REASON is not None, reason=f"no PostgreSQL: {_REASON}")]
PASSWORD = "Study-pw-51c2"  # must reach neither MLflow nor the workers' output


@pytest.fixture(scope="module")
def postgres():
    yield from _pg.running_cluster()


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    yield from _pg.running_mlflow_server(postgres, tmp_path_factory.mktemp("study-mlflow-server"))


def test_two_workers_on_two_folders_share_one_study(postgres, mlflow_server, embedded_root, small_cache, tmp_path):
    from mlflow.tracking import MlflowClient

    storage = postgres.create_database("optuna").replace("://postgres@", f"://postgres:{PASSWORD}@")
    overrides = small_overrides(embedded_root, small_cache, tmp_path, "study-scaleout", epochs=3)
    overrides = [o for o in overrides if not o.startswith(("data.cache_dir", "train.checkpoint_dir"))]
    overrides += ["data.cache_dir=cache", "train.checkpoint_dir=ckpt"]  # relative: each folder its own
    study_file = tmp_path / "scaleout.yaml"
    study_file.write_text(yaml.safe_dump({
        "name": "scaleout", "config": None, "overrides": overrides, "variants": {"ce": ["loss=ce"], "focal": ["loss=focal"]},
        "reference": "ce", "folds": [0, 1], "seeds": 1, "metrics": ["balanced_accuracy"], "split": "val",
        "heartbeat_interval": 2}))
    env = os.environ | {"MLFLOW_TRACKING_URI": mlflow_server.uri, STORAGE_ENV: storage, "OMP_NUM_THREADS": "1"}
    procs, logs = [], []
    for name in ("a", "b"):
        folder = tmp_path / f"machine-{name}"
        folder.mkdir()
        logs.append(folder / "worker.log")
        procs.append(subprocess.Popen([sys.executable, "-m", "losslab.cli", "study", "-c", str(study_file),
                                       "--no-progress"], cwd=folder, env=env, stdout=open(logs[-1], "w"),
                                      stderr=subprocess.STDOUT))
    codes = [p.wait(600) for p in procs]
    printed = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(text[-3000:] for text in printed)

    study = optuna.load_study(study_name="scaleout", storage=postgres.url("optuna", driver="psycopg2"))
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    by_worker = Counter(t.user_attrs["worker"].rpartition(":")[2] for t in complete)
    assert sorted(by_worker) == sorted(str(p.pid) for p in procs), by_worker  # the cells split between them
    assert sorted(t.user_attrs["cell"] for t in complete) == sorted(f"{v}|f{f}|s0" for v in ("ce", "focal") for f in (0, 1))

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("study-scaleout")
    runs = client.search_runs([exp.experiment_id], "tags.`losslab.study` = 'scaleout'")
    cells = [r for r in runs if r.data.tags["losslab.study_role"] == "cell"]
    (parent,) = [r for r in runs if r.data.tags["losslab.study_role"] == "parent"]
    assert Counter(r.data.tags["losslab.cell"] for r in cells if r.info.status == "FINISHED") == \
        Counter({t.user_attrs["cell"]: 1 for t in complete})
    assert {r.data.tags["mlflow.parentRunId"] for r in cells} == {parent.info.run_id}
    assert len({r.data.tags["losslab.split_fingerprint"] for r in cells}) == 1  # the same folds in both folders
    assert (tmp_path / "machine-a" / "cache").is_dir() and (tmp_path / "machine-b" / "cache").is_dir()
    table = pd.read_csv(client.download_artifacts(parent.info.run_id, "study_table.csv"))
    assert table.set_index("variant")["cells"].to_dict() == {"ce": 2, "focal": 2}
    lines = [{line for line in text.splitlines() if line.startswith("  focal − ce")} for text in printed]
    assert lines[0] == lines[1] and len(lines[0]) == 1  # one table, the same decision in both
    assert PASSWORD not in "".join(printed) and "***" in parent.data.tags["losslab.study_storage"]
