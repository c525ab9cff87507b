"""sweep on a real Optuna SQLite storage and the session's real SQLite MLflow store (no mocks)."""

from __future__ import annotations

import subprocess
import sys

import optuna
import pytest
from mlflow.tracking import MlflowClient

from losslab.config import ConfigError, dump_yaml, load_config
from losslab.redaction import redacted_salt
from losslab.pipelines.sweep import (
    OptunaReporter,
    best_config,
    best_config_yaml,
    build_pruner,
    open_study,
    run_sweep,
    sample_params,
    sweep_settings,
)

SPACE = {
    "loss": {"type": "categorical", "choices": ["ce", "focal"]},
    "loss.gamma": {"type": "float", "low": 0.0, "high": 5.0, "when": {"loss": "focal"}},
    "loss.label_smoothing": {"type": "float", "low": 0.0, "high": 0.3, "when": {"loss": "ce"}},
    "optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
}


def _sweep_cfg(make_config, tmp_path, experiment: str, **sweep):
    cfg = make_config(experiment=experiment)
    settings = {"storage": f"sqlite:///{tmp_path / 'optuna.db'}", "study": experiment, "n_trials": 3,
                "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"}, "space": SPACE} | sweep
    return cfg.model_copy(update={"sweep": settings})


def _children(client, run):
    return client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")


def _dotted(cfg_dict, key):
    node = cfg_dict
    for part in key.split("."):
        node = node[part]
    return node


def test_sweep_prunes_reports_best_and_continues(make_config, small_cache, tmp_path):
    cfg = _sweep_cfg(make_config, tmp_path, "sweep-sqlite")
    first = run_sweep(cfg, sweep_settings(cfg), info=small_cache)
    client = MlflowClient()
    study = optuna.load_study(study_name="sweep-sqlite", storage=cfg.sweep["storage"])
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3 and first.trials_run == 3

    parent = client.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["losslab.sweep_role"] == "parent"
    trial_runs = {int(r.data.tags["losslab.trial_number"]): r for r in _children(client, parent)}
    assert sorted(trial_runs) == [0, 1, 2]
    for t in study.trials:
        run = trial_runs[t.number]
        assert run.info.status == "FINISHED" and run.data.tags["losslab.trial_state"] == "COMPLETE"
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        assert {k: run.data.params[k] for k in t.params} == {k: str(v) for k, v in t.params.items()}
        # conditional sampling: gamma only for focal, label smoothing only for ce
        assert ("loss.gamma" in t.params) == (t.params["loss"] == "focal")
        assert ("loss.label_smoothing" in t.params) == (t.params["loss"] == "ce")
        assert run.data.metrics["objective"] == pytest.approx(t.value)
        history = sorted(client.get_metric_history(run.info.run_id, "val/balanced_accuracy"), key=lambda m: m.step)
        assert [m.step for m in history] == [0, 1]  # every epoch, on the trial run
        # the pruner saw the best value so far (sweep.report: best), the objective at each step
        assert t.intermediate_values == pytest.approx({0: history[0].value, 1: max(history[0].value, history[1].value)})
        assert t.value == pytest.approx(max(m.value for m in history))
        (fold_run,) = _children(client, run)  # the trial's train run nests under it
        assert fold_run.info.status == "FINISHED" and fold_run.data.params["loss.name"] == t.params["loss"]
        assert fold_run.data.params["optim.lr"] == str(t.params["optim.lr"])
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert parent.data.tags["best.optim.lr"] == str(study.best_params["optim.lr"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "trials.md", "best_params.json", "best_config.yaml", "sweep_space.json"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/optimization_history.png", "plots/param_importances.png"}

    # `losslab sweep --best`: YAML that loads with load_config and carries the best trial's params
    config_file = tmp_path / "sweep_experiment.yaml"
    config_file.write_text(dump_yaml(cfg))
    proc = subprocess.run([sys.executable, "-m", "losslab.cli", "sweep", "-c", str(config_file), "--best"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text == best_config_yaml(cfg, sweep_settings(cfg))
    path = tmp_path / "best.yaml"
    path.write_text(text)
    loaded = load_config(path)
    for key, value in study.best_params.items():
        got = loaded.loss.name if key == "loss" else _dotted(loaded.to_dict(), key)
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, key
    expected = best_config(cfg, study).to_dict()
    expected["data"]["salt"] = redacted_salt(cfg.data.salt)  # the salt is never printed, only its fingerprint
    assert loaded.to_dict() == expected and loaded.sweep is None and cfg.data.salt not in text

    # the same command again continues the study; now every trial is pruned at its first report
    cfg2 = cfg.model_copy(update={"sweep": cfg.sweep | {"n_trials": 2, "pruner": {"name": "threshold", "lower": 1.01}}})
    second = run_sweep(cfg2, sweep_settings(cfg2), info=small_cache)
    study = optuna.load_study(study_name="sweep-sqlite", storage=cfg.sweep["storage"])
    assert len(study.trials) == 5 and second.parent_run_id == first.parent_run_id
    pruned = study.trials[3:]
    assert [t.state.name for t in pruned] == ["PRUNED", "PRUNED"]
    trial_runs = {int(r.data.tags["losslab.trial_number"]): r for r in _children(client, parent)}
    assert sorted(trial_runs) == [0, 1, 2, 3, 4]
    for t in pruned:
        assert list(t.intermediate_values) == [0] and t.user_attrs["epochs_run"] == 1
        run = trial_runs[t.number]
        assert run.info.status == "KILLED" and run.data.tags["losslab.trial_state"] == "PRUNED"
        assert run.data.tags["losslab.pruned_at_step"] == "0"
        assert len(client.get_metric_history(run.info.run_id, "val/balanced_accuracy")) == 1
        (fold_run,) = _children(client, run)
        assert fold_run.info.status == "KILLED" and fold_run.data.tags["losslab.trial_state"] == "PRUNED"
        assert "losslab.error" not in fold_run.data.tags
    parent = client.get_run(first.parent_run_id)
    assert parent.data.metrics["trials_pruned"] == 2 and parent.data.metrics["trials_complete"] == 3


def test_trial_that_raises_is_failed_in_both_and_the_sweep_goes_on(make_config, small_cache, tmp_path):
    space = {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
             "train.monitor": {"type": "categorical", "choices": ["val/no_such_metric"]}}
    cfg = _sweep_cfg(make_config, tmp_path, "sweep-failing", n_trials=2, space=space, metric="val/balanced_accuracy")
    run_sweep(cfg, sweep_settings(cfg), info=small_cache)
    study = optuna.load_study(study_name="sweep-failing", storage=cfg.sweep["storage"])
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    client = MlflowClient()
    for t in study.trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED" and run.data.tags["losslab.trial_state"] == "FAIL"
        assert "no_such_metric" in run.data.tags["losslab.error"]


@pytest.mark.parametrize("direction, report, expected", [
    ("maximize", "best", [0.5, 0.8, 0.8, 0.9]),
    ("minimize", "best", [0.5, 0.5, 0.3, 0.3]),
    ("maximize", "epoch", [0.5, 0.8, 0.3, 0.9]),
])
def test_reporter_reports_best_so_far_or_each_epoch(direction, report, expected):
    study = optuna.create_study(direction=direction)  # in-memory storage, a real trial
    trial = study.ask()
    reporter = OptunaReporter(trial, "val/auc", step_offset=10, trial_run_id="", direction=direction, report=report)
    for epoch, value in enumerate([0.5, 0.8, 0.3, 0.9]):
        trial.report(reporter.value_to_report(value), 10 + epoch)
    study.tell(trial, 0.0)
    assert study.trials[0].intermediate_values == pytest.approx(dict(zip(range(10, 14), expected)))


def test_conditional_sampling_and_section_overrides():
    cfg = load_config(None, ["sweep={space: {}}"])
    settings = sweep_settings(cfg.model_copy(update={"sweep": {"space": SPACE}}))
    focal = sample_params(optuna.trial.FixedTrial({"loss": "focal", "loss.gamma": 2.5, "optim.lr": 0.004}), settings.space)
    assert focal == {"loss": "focal", "loss.gamma": 2.5, "optim.lr": 0.004}
    ce = sample_params(optuna.trial.FixedTrial({"loss": "ce", "loss.label_smoothing": 0.1, "optim.lr": 0.004}), settings.space)
    assert ce == {"loss": "ce", "loss.label_smoothing": 0.1, "optim.lr": 0.004}


def test_pruners_and_bad_settings_name_the_key():
    assert isinstance(build_pruner({"name": "median"}), optuna.pruners.MedianPruner)
    assert isinstance(build_pruner({"name": "hyperband", "min_resource": 1}), optuna.pruners.HyperbandPruner)
    base = load_config(None, [])
    default = sweep_settings(base.model_copy(update={"sweep": {"space": SPACE}}))
    assert default.pruner == {"name": "median"}
    with pytest.raises(ConfigError, match="sweep.pruner.name = 'medain'"):
        build_pruner({"name": "medain"})
    with pytest.raises(ConfigError, match="sweep.space is empty"):
        sweep_settings(base)
    with pytest.raises(ConfigError, match=r"sweep\.space\.optim\.lr.*low"):
        sweep_settings(base.model_copy(update={"sweep": {"space": {"optim.lr": {"type": "float", "high": 1}}}}))
    with pytest.raises(ConfigError, match="refers to 'loss'"):
        sweep_settings(base.model_copy(update={"sweep": {"space": {"loss.gamma": SPACE["loss.gamma"]}}}))
    with pytest.raises(ConfigError, match="sweep.n_trials"):
        sweep_settings(base.model_copy(update={"sweep": {"space": SPACE, "n_trials": 0}}))


def test_bad_space_value_fails_before_any_trial(make_config, small_cache, tmp_path):
    space = {"loss.gamma": {"type": "float", "low": 0.0, "high": 5.0}}  # the base loss is ce: no gamma
    cfg = _sweep_cfg(make_config, tmp_path, "sweep-bad-space", space=space)
    with pytest.raises(ConfigError, match="sweep.space.loss.gamma = 0.0 .*unknown parameter"):
        run_sweep(cfg, sweep_settings(cfg), info=small_cache)
    with pytest.raises(KeyError):  # no study was created
        optuna.load_study(study_name="sweep-bad-space", storage=cfg.sweep["storage"])
    with pytest.raises(ConfigError, match="no study 'sweep-bad-space'"):
        open_study(cfg, sweep_settings(cfg), load_only=True)


def test_k_fold_trial_objective_is_the_mean_over_folds(make_config, small_cache, tmp_path):
    space = {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    cfg = _sweep_cfg(lambda **kw: make_config("train.epochs=1", **kw), tmp_path, "sweep-kfold",
                     n_trials=1, folds=[0, 2], space=space)
    run_sweep(cfg, sweep_settings(cfg), info=small_cache)
    (trial,) = optuna.load_study(study_name="sweep-kfold", storage=cfg.sweep["storage"]).trials
    client = MlflowClient()
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    folds = sorted(_children(client, run), key=lambda r: int(r.data.tags["losslab.fold"]))
    assert [r.data.tags["losslab.fold"] for r in folds] == ["0", "2"]
    per_fold = [r.data.metrics["best_val/balanced_accuracy"] for r in folds]
    assert trial.value == pytest.approx(sum(per_fold) / 2)
    assert run.data.metrics["objective_fold2"] == pytest.approx(per_fold[1])
    assert sorted(trial.intermediate_values) == [0, 1]  # step = fold position x epochs + epoch
