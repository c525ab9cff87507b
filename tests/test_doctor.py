"""losslab doctor: findings from runs read back from MLflow — runs made by hand with each alarm's
evidence, and a real training run built to fail (a learning rate too small to move the prior-initialised
classifier: the minority class is never predicted)."""

from __future__ import annotations

import uuid

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from losslab.pipelines.doctor import RULES, diagnose, run_doctor

PARAMS = {"loss.name": "ce", "optim.lr": "0.003", "optim.weight_decay": "0.0001", "data.bag_size": "12",
          "data.num_folds": "5"}


def _run(name: str, tags: dict[str, str], metrics: dict[str, float], params: dict[str, str] = PARAMS) -> str:
    with mlflow.start_run(run_name=name, tags={"losslab.entry_point": "train", "losslab.fold": "0"} | tags) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
    return run.info.run_id


def test_rules_are_one_table_with_a_reason_for_every_change():
    assert [r.alarm for r in RULES] == ["dead_class", "overfitting", "unstable", "attention_collapsed"]
    for rule in RULES:
        assert rule.cause and rule.changes and rule.evidence
        assert all("=" in c.override and len(c.reason) > 20 for c in rule.changes)


def test_each_alarm_gets_its_cause_and_changes_filled_from_the_run():
    findings = diagnose(PARAMS, {"losslab.alarm.overfitting": "val/loss - train/loss = 0.9 > 0.5",
                                 "losslab.alarm.unstable": "variance ..."},
                        {"best_epoch": 2.0, "val/attention_entropy_normalised": 0.05})
    by_alarm = {f.alarm: f for f in findings}
    assert list(by_alarm) == ["overfitting", "unstable", "attention_collapsed"]
    overfit = dict(by_alarm["overfitting"].changes)
    assert {"optim.weight_decay=0.001", "train.epochs=3", "data.bag_size=6"} <= set(overfit)
    unstable = dict(by_alarm["unstable"].changes)
    assert {"optim.lr=0.001", "data.num_folds=4", "train.ema_decay=0.999"} <= set(unstable)
    assert by_alarm["attention_collapsed"].evidence == "val/attention_entropy_normalised = 0.05 (< 0.15)"
    assert "model.head=topk" in dict(by_alarm["attention_collapsed"].changes)
    assert diagnose(PARAMS, {}, {"val/attention_entropy_normalised": 0.8, "best_val/dead_class_count": 0.0}) == []
    # a change the run already has is not suggested; a param the run did not log is named, not invented
    dead = diagnose({"loss.name": "logit_adjusted"}, {}, {"best_val/dead_class_count": 1.0})[0]
    assert dead.alarm == "dead_class" and "loss=logit_adjusted" not in dict(dead.changes)
    counts = diagnose(PARAMS, {}, {"val/pred_count_LGG": 0.0, "val/pred_count_HGG": 9.0})[0]
    assert counts.evidence == "val/pred_count_<class> = 0 at the last epoch for LGG"
    unstable_bare = dict(diagnose({}, {"losslab.alarm.unstable": "x"}, {})[0].changes)
    assert "optim.lr=<lr_third: the run did not log the params it needs>" in unstable_bare


def test_doctor_on_an_experiment_writes_doctor_md_and_a_tag(mlflow_store):
    from typer.testing import CliRunner

    from losslab.cli import app

    name = f"doctor-{uuid.uuid4().hex[:8]}"
    mlflow.set_experiment(name)
    sick = _run("ce-f0", {"losslab.alarm.overfitting": "val/loss - train/loss = 0.9 > 0.5"}, {"best_epoch": 1.0})
    healthy = _run("ce-f1", {}, {"best_val/dead_class_count": 0.0, "val/attention_entropy_normalised": 0.7})
    result = run_doctor(name)
    assert [f.alarm for f in result.findings[sick]] == ["overfitting"] and result.findings[healthy] == []
    client = MlflowClient()
    assert client.get_run(sick).data.tags["losslab.doctor"] == "overfitting"
    assert client.get_run(healthy).data.tags["losslab.doctor"] == "healthy"
    md = open(mlflow.artifacts.download_artifacts(run_id=sick, artifact_path="doctor.md")).read()
    assert "## overfitting" in md and "`train.epochs=2`" in md and "likely cause" in md
    out = CliRunner().invoke(app, ["doctor", sick, "--no-log"])
    assert out.exit_code == 0 and "optim.weight_decay=0.001" in out.output and "1 with alarms" in out.output
    missing = CliRunner().invoke(app, ["doctor", "no-such-experiment-or-run"])
    assert missing.exit_code == 2 and "neither a run id nor an experiment" in missing.output


@pytest.mark.slow
def test_a_run_built_to_fail_with_a_dead_class(make_config, small_cache):
    from losslab.pipelines.train import run_train

    cfg = make_config("optim.lr=1e-7", "optim.scheduler=none", "train.epochs=2", "tracking.log_model=false",
                      experiment="doctor-dead-class")
    run_id = run_train(cfg, info=small_cache).folds[0].run_id
    assert "losslab.alarm.dead_class" in MlflowClient().get_run(run_id).data.tags  # the engine's alarm fired
    result = run_doctor(run_id)
    finding = result.findings[run_id][0]
    assert finding.alarm == "dead_class" and finding.evidence.startswith("losslab.alarm.dead_class")
    assert "loss=logit_adjusted" in dict(finding.changes)
    assert MlflowClient().get_run(run_id).data.tags["losslab.doctor"].startswith("dead_class")
