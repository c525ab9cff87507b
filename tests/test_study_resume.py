"""A study survives SIGKILL: of the process that created it (one worker, in that process), and of one of
two worker processes. Running the command again (or the surviving worker) finishes the study with
exactly one FINISHED train run per cell: the killed cell's run resumed from its last checkpoint, and the
tables count each cell once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from _study import small_overrides
from losslab.config.study import load_study

pytestmark = pytest.mark.slow


def _study_file(tmp_path, name, embedded_root, small_cache, folds: list[int]) -> tuple:
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    overrides = small_overrides(embedded_root, small_cache, tmp_path, f"study-{name}", epochs=3)
    data = {"name": name, "config": None, "overrides": overrides + ["train.upload_checkpoint_every=1"],
            "variants": {"ce": ["loss=ce"], "focal": ["loss=focal"]}, "reference": "ce", "folds": folds,
            "seeds": 1, "metrics": ["balanced_accuracy"], "split": "val", "storage": storage,
            "heartbeat_interval": 1, "grace_period": 3}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, storage


def _start(path, tmp_path, *extra) -> subprocess.Popen:
    log = open(tmp_path / "command.log", "w")
    return subprocess.Popen([sys.executable, "-m", "losslab.cli", "study", "-c", str(path), "--no-progress", *extra],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"})


def _kill_mid_cell(proc, name, storage, tmp_path, pick_pid) -> str:
    """SIGKILL the process running a cell once that cell has finished two of its three epochs (so a
    checkpoint is on disk and uploaded); return the cell's key."""
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the study ended before a kill\n" + (tmp_path / "command.log").read_text()[-3000:]
        time.sleep(0.2)
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            continue
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            pid = int(t.user_attrs.get("claimed_by", "x:0").rpartition(":")[2])
            if t.user_attrs.get("epoch", 0) >= 2 and pick_pid(pid):
                os.kill(pid, signal.SIGKILL)
                return t.user_attrs["cell"]
    raise AssertionError("no cell reached its third epoch\n" + (tmp_path / "command.log").read_text()[-3000:])


def _check_once_each(name: str, killed: str, result, folds: list[int]) -> None:
    client = MlflowClient()
    exp = client.get_experiment_by_name(f"study-{name}")
    runs = client.search_runs([exp.experiment_id], f"tags.`losslab.study` = '{name}' and tags.`losslab.study_role` = 'cell'")
    finished = Counter(r.data.tags["losslab.cell"] for r in runs if r.info.status == "FINISHED")
    assert finished == Counter({f"{v}|f{f}|s0": 1 for v in ("ce", "focal") for f in folds}), \
        [(r.data.tags["losslab.cell"], r.info.status) for r in runs]
    assert not [r for r in runs if r.info.status == "RUNNING"]
    (resumed,) = [r for r in runs if r.data.tags["losslab.cell"] == killed]  # the same run, continued
    assert resumed.info.status == "FINISHED" and resumed.data.tags["losslab.resumed_from"].endswith("last.pt")
    assert "losslab.error" not in resumed.data.tags
    assert sorted(result.frame["cell"]) == sorted(finished)  # the tables count each cell once
    table = pd.read_csv(client.download_artifacts(result.parent_run_id, "study_table.csv"))
    assert table.set_index("variant")["cells"].to_dict() == {"ce": len(folds), "focal": len(folds)}


def test_sigkill_of_the_process_that_created_the_study(embedded_root, small_cache, tmp_path):
    from losslab.pipelines.study import run_study

    path, storage = _study_file(tmp_path, "killed-creator", embedded_root, small_cache, [0])
    proc = _start(path, tmp_path)
    killed = _kill_mid_cell(proc, "killed-creator", storage, tmp_path, lambda pid: pid == proc.pid)
    assert proc.wait(60) == -signal.SIGKILL
    result = run_study(load_study(path), show_progress=False)  # the same command again
    assert result.complete and 1 <= result.trained_here <= 2
    _check_once_each("killed-creator", killed, result, [0])


def test_sigkill_of_one_of_two_workers(embedded_root, small_cache, tmp_path):
    from losslab.pipelines.study import run_study

    path, storage = _study_file(tmp_path, "killed-worker", embedded_root, small_cache, [0, 1])
    proc = _start(path, tmp_path, "--workers", "2")
    killed = _kill_mid_cell(proc, "killed-worker", storage, tmp_path, lambda pid: pid not in (0, proc.pid))
    assert proc.wait(400) == 0, (tmp_path / "command.log").read_text()[-4000:]  # the other worker finished it
    study = optuna.load_study(study_name="killed-worker", storage=storage)
    dead = [t for t in study.get_trials(deepcopy=False) if t.state.name == "FAIL"]
    assert len(dead) == 1 and dead[0].user_attrs["cell"] == killed
    (retry,) = [t for t in study.get_trials(deepcopy=False) if t.system_attrs.get("failed_trial") == dead[0].number]
    assert retry.state.name == "COMPLETE" and retry.user_attrs["worker"] != dead[0].user_attrs["worker"]
    again = run_study(load_study(path), show_progress=False)  # the command again: nothing left to train
    assert again.complete and again.trained_here == 0
    _check_once_each("killed-worker", killed, again, [0, 1])
