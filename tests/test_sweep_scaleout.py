"""Scale-out for real: a PostgreSQL cluster, an MLflow server on it, and sweep workers as separate
processes (`python -m losslab.cli sweep --storage postgresql://...`) on one study."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

import _pg
from losslab.config import dump_yaml
from losslab.pipelines.sweep import STORAGE_ENV
from losslab.redaction import redact_text

_REASON = _pg.unavailable_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_REASON is not None, reason=f"no PostgreSQL: {_REASON}")]

SPACE = {
    "loss": {"type": "categorical", "choices": ["ce", "focal"]},
    "loss.gamma": {"type": "float", "low": 0.0, "high": 5.0, "when": {"loss": "focal"}},
    "optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
}
STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
PASSWORD = "Pg-pw-7f3a9"  # must never reach MLflow or the workers' output


@pytest.fixture(scope="module")
def postgres():
    yield from _pg.running_cluster()


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    yield from _pg.running_mlflow_server(postgres, tmp_path_factory.mktemp("mlflow-server"))


class Worker:
    """``losslab sweep`` as a process; the storage URL (with its password) comes from ``env``
    ($LOSSLAB_SWEEP_STORAGE) or the config file, never from the command line."""

    def __init__(self, name: str, config_file: Path, study: str, n_trials: int, env: dict, logs: Path):
        self.log_path = logs / f"worker-{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "losslab.cli", "sweep", "-c", str(config_file),
             "--study", study, "--n-trials", str(n_trials)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.log.close()

    def tail(self) -> str:
        return f"--- {self.log_path.name}\n" + self.log_path.read_text()[-4000:]


def _mine(trial, worker: Worker) -> bool:
    return trial.user_attrs.get("worker", "").endswith(f":{worker.pid}")


def test_two_workers_one_study_and_a_killed_worker_is_retried(postgres, mlflow_server, make_config, tmp_path):
    from mlflow.tracking import MlflowClient

    from losslab.tracking import find_trial_runs

    # plain postgresql://, as a user writes it, with a password (trust authentication ignores it)
    storage_url = postgres.create_database("optuna").replace("://postgres@", f"://postgres:{PASSWORD}@")
    storage = optuna.storages.RDBStorage(postgres.url("optuna", driver="psycopg2"))  # the test's own view
    study_name = "scaleout"
    cfg = make_config("train.epochs=2", experiment="sweep-scaleout")
    cfg = cfg.model_copy(update={"sweep": {
        "space": SPACE, "sampler": {"name": "random"}, "pruner": {"name": "median", "n_startup_trials": 2},
        "heartbeat_interval": 1, "grace_period": 3, "max_retry": 1, "num_threads": 1, "storage": storage_url}})
    config_file = tmp_path / "sweep.yaml"
    config_file.write_text(dump_yaml(cfg))  # worker c reads the storage URL from here
    env = os.environ | {"MLFLOW_TRACKING_URI": mlflow_server.uri, "OMP_NUM_THREADS": "1"}
    env.pop(STORAGE_ENV, None)
    a = Worker("a", config_file, study_name, 2, env | {STORAGE_ENV: storage_url}, tmp_path)
    b = Worker("b", config_file, study_name, 2, env | {STORAGE_ENV: storage_url}, tmp_path)
    workers = [a, b]
    try:
        # SIGKILL worker a in the middle of its first trial: after epoch 0 was reported, during epoch 1
        deadline = time.monotonic() + 150
        killed = None
        while killed is None:
            assert time.monotonic() < deadline, "worker a never got to epoch 1 of a trial\n" + a.tail() + b.tail()
            assert a.proc.poll() is None, "worker a exited early\n" + a.tail()
            time.sleep(0.2)
            try:
                study = optuna.load_study(study_name=study_name, storage=storage)
            except KeyError:
                continue
            running = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                       if _mine(t, a) and t.intermediate_values and "mlflow_run_id" in t.user_attrs]
            if running:
                a.proc.send_signal(signal.SIGKILL)
                killed = running[0].number
        assert a.wait(30) == -signal.SIGKILL
        assert b.wait(240) == 0, b.tail()
        # the same command on a fresh machine: continues the study, and the dead trial is failed by
        # heartbeat (here or already in b) and retried with the same params
        time.sleep(3)
        c = Worker("c", config_file, study_name, 1, env, tmp_path)
        workers.append(c)
        assert c.wait(240) == 0, c.tail()
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
    logs = "".join(w.tail() for w in workers)

    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials))), logs  # none lost, none duplicated
    by_worker = {w: [t.number for t in trials if _mine(t, w)] for w in (a, b, c)}
    assert len(by_worker[b]) == 2 and len(by_worker[c]) == 1 and killed in by_worker[a], logs
    assert sum(map(len, by_worker.values())) == len(trials), logs
    dead = trials[killed]
    assert dead.state.name == "FAIL", logs
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state.name in ("COMPLETE", "PRUNED"), logs
    assert retries[0].params == dead.params
    assert all(t.state.name in STATUS for t in trials), [t.state.name for t in trials]
    # a and b really ran at the same time
    first_b = trials[by_worker[b][0]]
    assert first_b.datetime_start < dead.datetime_complete and dead.datetime_start < first_b.datetime_complete

    # MLflow (through the server): exactly one trial run per Optuna trial, in the matching state
    import mlflow

    mlflow.set_tracking_uri(mlflow_server.uri)
    client = MlflowClient(mlflow_server.uri)
    runs = find_trial_runs(study_name)
    run_numbers = sorted(int(r.data.tags["losslab.trial_number"]) for r in runs)
    assert run_numbers == numbers, logs
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 1  # one parent run for the study, shared by all workers
    (parent_id,) = parents
    assert client.get_run(parent_id).data.tags["losslab.sweep_role"] == "parent"
    for run in runs:
        t = trials[int(run.data.tags["losslab.trial_number"])]
        assert run.info.status == STATUS[t.state.name], (t.number, t.state, run.info.status)
        assert run.data.tags["losslab.trial_state"] == t.state.name
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
    dead_run = next(r for r in runs if int(r.data.tags["losslab.trial_number"]) == killed)
    assert "stopped sending heartbeats" in dead_run.data.tags["losslab.error"]
    children = client.search_runs([dead_run.info.experiment_id], f"tags.mlflow.parentRunId = '{dead_run.info.run_id}'")
    assert [r.info.status for r in children] == ["FAILED"]  # its train run, left RUNNING by the kill
    exp = client.get_experiment_by_name("sweep-scaleout")
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'"), "runs left RUNNING"
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"trials.csv", "trials.md"} <= artifacts

    # the storage password is nowhere: not in the MLflow database (params, tags, every table), not in
    # any artifact the server stored, not in what the workers printed
    fold_params = [r.data.params for r in client.search_runs([exp.experiment_id], "tags.`losslab.sweep_role` = 'fold'")]
    assert fold_params and all(p["sweep.storage"] == redact_text(storage_url) for p in fold_params)
    assert "***" in fold_params[0]["sweep.storage"]
    assert PASSWORD not in _database_text(postgres, "mlflow")
    stored = [p for p in mlflow_server.artifacts_dir.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in stored)
    assert not [p for p in stored if PASSWORD.encode() in p.read_bytes()]
    printed = "".join(w.log_path.read_text() for w in workers)
    assert PASSWORD not in printed and f"postgres:***@127.0.0.1:{postgres.port}/optuna" in printed


def _database_text(postgres, database: str) -> str:
    """Every row of every table of a database, as text."""
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=postgres.port, user="postgres", dbname=database)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
            tables = [row[0] for row in cur.fetchall()]
            parts = []
            for table in tables:
                cur.execute(f'SELECT * FROM "{table}"')
                parts.append(repr(cur.fetchall()))
    finally:
        conn.close()
    assert "params" in tables and "tags" in tables
    return "\n".join(parts)
