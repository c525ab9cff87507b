"""Tracking faults and honest bookkeeping, on real SQLite stores:

* a tracking URI in a folder that does not exist warns, naming it;
* workers starting together on a fresh SQLite store do not race on MLflow's schema migration;
* an unwritable checkpoint folder is refused before any run opens; local checkpoint copies are removed
  once uploaded and kept when the upload failed;
* under ``mlflow run`` (a launcher run in ``$MLFLOW_RUN_ID``) the parent of the train runs is in the
  config's experiment, not ``Default``, and a single-fold train sets the registry alias;
* ``best_val/*`` are logged at the best epoch's step;
* a model with one head per task (distill) gets the learning curves and no per-class plots, by an
  explicit flag: per-class plots without class names are refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from losslab.config import ConfigError, TrackingConfig
from losslab.engine.loop import FitState
from losslab.pipelines.common import entry_point_run
from losslab.pipelines.train import run_train
from losslab.tracking import MLflowCallback, setup_tracking

REPO = Path(__file__).resolve().parents[1]


def test_a_store_in_a_missing_folder_warns_naming_it(tmp_path):
    missing = tmp_path / "typo" / "store"
    with pytest.warns(UserWarning, match=f"tracking store sqlite:///{missing}/mlflow.db: folder {missing} does not exist"):
        setup_tracking(TrackingConfig(tracking_uri=f"sqlite:///{missing}/mlflow.db", experiment="warned"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same store again, or one in an existing folder: no warning
        setup_tracking(TrackingConfig(tracking_uri=f"sqlite:///{missing}/mlflow.db", experiment="warned"))
        setup_tracking(TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/other.db", experiment="quiet"))


_WORKER = """
import sys, time
go = float(sys.argv[2])
time.sleep(max(0.0, go - time.time()))
import mlflow
from losslab.config import TrackingConfig
from losslab.tracking import setup_tracking
setup_tracking(TrackingConfig(tracking_uri=sys.argv[1], experiment="race"))
with mlflow.start_run():
    mlflow.log_metric("worker", float(sys.argv[3]))
"""


def test_workers_starting_together_on_a_fresh_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    env.pop("MLFLOW_TRACKING_URI")
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    go = time.time() + 12  # every worker has imported everything by then; they start their store together
    workers = [subprocess.Popen([sys.executable, str(script), uri, str(go), str(i)], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(3)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], "\n---\n".join(o[-3000:] for o in outputs)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.data.metrics["worker"] for r in runs) == [0.0, 1.0, 2.0]


def test_unwritable_checkpoint_dir_is_refused_before_any_run(make_config, small_cache, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = make_config(f"train.checkpoint_dir={blocker / 'ckpt'}", experiment="unwritable-ckpt")
    with pytest.raises(ConfigError, match=rf"^train.checkpoint_dir = '{blocker / 'ckpt'}' in command-line override "
                                          r".*: not writable"):
        run_train(cfg, info=small_cache)
    exp = MlflowClient().get_experiment_by_name("unwritable-ckpt")
    assert exp is None or MlflowClient().search_runs([exp.experiment_id]) == []


def test_checkpoints_stay_local_when_the_upload_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSLAB_TRACKING_STRICT", "0")  # tracking failures warn, as in production
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    client = MlflowClient()
    exp_id = client.create_experiment(f"upload-fails-{time.time_ns()}", artifact_location=(blocker / "art").as_uri())
    run = client.create_run(exp_id)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("best.pt", "last.pt"):
        (ckpt / name).write_bytes(b"weights")
    callback = MLflowCallback(run.info.run_id, ["a", "b"])
    state = FitState(checkpoint_dir=ckpt)
    callback.on_checkpoint(state, ckpt / "best.pt", "best")
    with pytest.warns(UserWarning, match="MLflow tracking failed in on_exception"):
        callback.on_exception(state, RuntimeError("boom"))
    assert callback.remove_uploaded_checkpoints() == []
    assert sorted(p.name for p in ckpt.iterdir()) == ["best.pt", "last.pt"]


def _plot_artifacts(figures, class_names: list[str]) -> list[str]:
    import numpy as np

    client = MlflowClient()
    exp_id = client.create_experiment(f"plots-{time.time_ns()}")
    history = {"train/loss": [1.0, 0.5], "val/loss": [1.1, 0.7], "val/recall_a": [0.5, 1.0],
               "val/recall_b": [0.5, 0.0]}
    outputs = {"labels": np.array([0, 1]), "probs": np.array([[0.9, 0.1], [0.6, 0.4]])}
    with mlflow.start_run(experiment_id=exp_id) as run:  # the pipeline's run: figures go to the active run
        callback = MLflowCallback(run.info.run_id, class_names, figures=figures)
        callback.on_fit_end(FitState(epoch=1, history=history, last_val_outputs=outputs))
    return sorted(a.path for a in client.list_artifacts(run.info.run_id, "plots"))


def test_the_task_draws_the_figures_and_without_one_only_the_learning_curves_are_drawn():
    from losslab.tasks import classification_figures

    assert _plot_artifacts(classification_figures, ["a", "b"]) == [
        "plots/confusion_matrix.png", "plots/curves.png", "plots/loss_curves.png", "plots/per_class_recall.png"]
    assert _plot_artifacts(None, []) == ["plots/curves.png", "plots/loss_curves.png"]


def test_mlflow_run_parent_moves_to_the_config_experiment_and_the_alias_is_set(make_config, small_cache, monkeypatch):
    from mlflow.projects import _maybe_set_run_terminated

    cfg = make_config("train.epochs=1", "train.max_train_batches=2", "tracking.registered_model_name=launcher-model",
                      experiment="launched")
    client = MlflowClient()
    # what `mlflow run . -e train` does without --experiment-name: a run in Default, its id in the environment
    launcher = client.create_run("0", run_name="launcher", tags={"mlflow.project.entryPoint": "train"})
    client.log_param(launcher.info.run_id, "config", "demo.yaml")
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher.info.run_id)
    with entry_point_run("train", cfg.tracking) as parent_id:
        result = run_train(cfg, info=small_cache)
    exp_id = client.get_experiment_by_name("launched").experiment_id
    parent, child = client.get_run(parent_id), client.get_run(result.folds[0].run_id)
    assert parent.info.experiment_id == child.info.experiment_id == exp_id
    assert child.data.tags["mlflow.parentRunId"] == parent_id and parent.info.status == "FINISHED"
    assert parent.data.params == {"config": "demo.yaml"} and parent.data.tags["mlflow.project.entryPoint"] == "train"
    # the Default run only points to its continuation; `mlflow run` ends it when the command ends
    old = client.get_run(launcher.info.run_id)
    assert old.data.tags["losslab.continued_as"] == parent_id and parent_id in old.data.tags["mlflow.note.content"]
    assert client.search_runs(["0"], f"tags.`losslab.entry_point` = 'train'") == []
    _maybe_set_run_terminated(old, "FINISHED")
    assert client.get_run(launcher.info.run_id).info.status == "FINISHED"
    assert client.get_model_version_by_alias("launcher-model", "candidate").run_id == child.info.run_id


def test_best_val_metrics_are_logged_at_the_best_epoch(make_config, small_cache):
    # the head learning rate falls every epoch (cosine, no warm-up): with it as the monitor, epoch 0 is the best
    cfg = make_config("train.epochs=2", "train.max_train_batches=2", "train.monitor=train/lr", "optim.warmup_epochs=0",
                      "tracking.log_model=false", experiment="best-step")
    run_id = run_train(cfg, info=small_cache).folds[0].run_id
    client = MlflowClient()
    assert [m.step for m in client.get_metric_history(run_id, "train/lr")] == [0, 1]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "best_epoch")] == [(0, 0.0)]
    best = client.get_metric_history(run_id, "best_val/balanced_accuracy")
    at_epoch_0 = [m.value for m in client.get_metric_history(run_id, "val/balanced_accuracy") if m.step == 0]
    assert [m.step for m in best] == [0] and best[0].value == pytest.approx(at_epoch_0[0], abs=1e-9)
