"""No secret reaches MLflow, logs or printed text: URL passwords (a PostgreSQL storage URL) and the
de-identification salt are redacted by one function (losslab.redaction) wherever a config is logged.
Real SQLite MLflow store, no mocks; the PostgreSQL scale-out test checks a real server too."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from losslab.config import ConfigError, dump_yaml
from losslab.data.deid import resolve_salt
from losslab.pipelines.sweep import STORAGE_ENV, sweep_settings
from losslab.pipelines.train import run_train
from losslab.redaction import redact_config, redact_text, redacted_salt, salt_fingerprint
from losslab.tracking import managed_run

PASSWORD = "Pw-s3cret-4c9e"
URL = f"postgresql://losslab:{PASSWORD}@db.invalid:5432/optuna"
SPACE = "sweep.space={optim.lr: {type: float, low: 0.001, high: 0.01, log: true}}"


def _fingerprint(salt: str) -> str:  # the documented formula, computed independently
    return hashlib.sha256(("losslab-salt-fingerprint:" + salt).encode()).hexdigest()[:8]


@pytest.mark.parametrize("text, expected", [
    (URL, "postgresql://losslab:***@db.invalid:5432/optuna"),
    ("postgresql+psycopg2://u:p@ss/w@h/db", "postgresql+psycopg2://u:***@h/db"),  # '@' and '/' in the password
    ("redis://:only-pw@cache:6379", "redis://:***@cache:6379"),
    ("failed: 'postgresql://u:pw@h/db' (x@y)", "failed: 'postgresql://u:***@h/db' (x@y)"),
    ("postgresql://h/db?user=u&password=pw&sslmode=require", "postgresql://h/db?user=u&password=***&sslmode=require"),
    ("http://mlflow.example.org:5000/api", "http://mlflow.example.org:5000/api"),  # nothing to hide
    ("postgresql://losslab@db/optuna and user@host", "postgresql://losslab@db/optuna and user@host"),
])
def test_redact_text_hides_every_url_password_and_nothing_else(text, expected):
    assert redact_text(text) == expected


def test_redact_config_hides_the_salt_behind_a_fingerprint():
    data = {"data": {"salt": "pepper", "root": "x"}, "sweep": {"storage": URL, "list": [URL]}}
    out = redact_config(data)
    assert out["data"]["salt"] == "redacted-sha256:" + _fingerprint("pepper")
    assert salt_fingerprint("pepper") == _fingerprint("pepper") and salt_fingerprint("pepper2") != _fingerprint("pepper")
    assert PASSWORD not in repr(out) and data["sweep"]["storage"] == URL  # the input is not changed
    assert redact_config({"data": {"salt": None}})["data"]["salt"] is None


def test_a_redacted_salt_resolves_only_to_the_salt_with_that_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSLAB_SALT", "pepper")
    assert resolve_salt(redacted_salt("pepper"), tmp_path) == "pepper"
    monkeypatch.setenv("LOSSLAB_SALT", "another")
    with pytest.raises(ValueError, match="set data.salt or \\$LOSSLAB_SALT to the original salt") as err:
        resolve_salt(redacted_salt("pepper"), tmp_path)
    assert "another" not in str(err.value) and "pepper" not in str(err.value)


def test_storage_comes_from_the_environment_or_a_file_before_the_config(make_config, tmp_path, monkeypatch):
    cfg = make_config(SPACE, "sweep.storage=sqlite:///from-config.db")
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    assert sweep_settings(cfg).storage == "sqlite:///from-config.db"
    secret_file = tmp_path / "storage.txt"
    secret_file.write_text(f"\n{URL}\n")
    with_file = make_config(SPACE, "sweep.storage=sqlite:///from-config.db", f"sweep.storage_file={secret_file}")
    assert sweep_settings(with_file).storage == URL
    monkeypatch.setenv(STORAGE_ENV, "sqlite:///from-env.db")
    assert sweep_settings(with_file).storage == "sqlite:///from-env.db"
    assert sweep_settings(with_file, storage="sqlite:///from-cli.db").storage == "sqlite:///from-cli.db"
    monkeypatch.delenv(STORAGE_ENV)
    with pytest.raises(ConfigError, match="sweep.storage_file: .*missing.txt does not exist"):
        sweep_settings(make_config(SPACE, f"sweep.storage_file={tmp_path / 'missing.txt'}"))
    with pytest.raises(ConfigError) as err:  # a bad setting next to the URL: the message does not echo the password
        sweep_settings(make_config(SPACE, f"sweep.storage={URL}", "sweep.n_trials=0"))
    assert PASSWORD not in str(err.value)


def _everything_logged(client: MlflowClient, run_id: str) -> str:
    """Params, tags and the text of every artifact of a run (and of the models it logged)."""
    run = client.get_run(run_id)
    parts = [repr(run.data.params), repr(run.data.tags)]
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="", dst_path=tmp))
        parts += [p.read_bytes().decode("latin-1") for p in local.rglob("*") if p.is_file()]
    for model in client.search_logged_models([run.info.experiment_id]):
        if model.source_run_id == run_id:
            parts += [repr(model.params), repr(model.tags)]
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(mlflow.artifacts.download_artifacts(f"models:/{model.model_id}", dst_path=tmp))
                parts += [p.read_bytes().decode("latin-1") for p in local.rglob("*") if p.is_file()]
    return "\n".join(parts)


def test_no_password_or_salt_in_a_runs_params_tags_artifacts_or_output(make_config, small_cache, capfd):
    salt = f"pepper-{uuid.uuid4().hex}"
    cfg = make_config("train.epochs=1", f"data.salt={salt}", f"sweep.storage={URL}", SPACE,
                      "tracking.registered_model_name=secrets-test", experiment="secrets")
    result = run_train(cfg, info=small_cache)
    run_id = result.folds[0].run_id
    client = MlflowClient()
    logged = _everything_logged(client, run_id)
    assert "config.yaml" in {a.path for a in client.list_artifacts(run_id)}
    assert PASSWORD not in logged and salt not in logged
    params = client.get_run(run_id).data.params
    assert params["sweep.storage"] == "postgresql://losslab:***@db.invalid:5432/optuna"
    assert params["data.salt"] == "redacted-sha256:" + _fingerprint(salt)
    out, err = capfd.readouterr()
    assert PASSWORD not in out + err and salt not in out + err

    # an error whose text carries the URL: the losslab.error and traceback tags are redacted
    mlflow.set_experiment("secrets")
    with pytest.raises(ConnectionError):
        with managed_run(run_name="fails") as run:
            raise ConnectionError(f"could not connect to {URL}")
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["losslab.error"] == "ConnectionError: could not connect to postgresql://losslab:***@db.invalid:5432/optuna"
    assert PASSWORD not in tags["losslab.traceback"]
    assert PASSWORD not in dump_yaml(cfg, redact=True) and salt not in dump_yaml(cfg, redact=True)


def test_a_sweep_that_cannot_reach_its_database_prints_no_password(make_config, small_cache, tmp_path):
    """The command line's failure output (error line and traceback) never shows the storage password."""
    cfg = make_config(SPACE, "sweep.n_trials=1", "sweep.heartbeat_interval=null", experiment="secrets-cli")
    config_file = tmp_path / "sweep.yaml"
    config_file.write_text(dump_yaml(cfg))
    env = os.environ | {STORAGE_ENV: URL.replace("db.invalid:5432", "127.0.0.1:1")}
    proc = subprocess.run([sys.executable, "-m", "losslab.cli", "sweep", "-c", str(config_file)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "127.0.0.1" in proc.stdout + proc.stderr, proc.stderr[-3000:]  # it did try, and said where
    assert PASSWORD not in proc.stdout + proc.stderr


def test_the_mlproject_sweep_entry_point_takes_no_storage_url():
    """`mlflow run -P storage=...` would log the URL as a param and print it: the parameter is gone
    (the URL comes from $LOSSLAB_SWEEP_STORAGE or sweep.storage_file)."""
    import yaml

    project = yaml.safe_load((Path(__file__).resolve().parents[1] / "MLproject").read_text())
    sweep = project["entry_points"]["sweep"]
    assert "storage" not in sweep["parameters"] and "storage" not in sweep["command"]
