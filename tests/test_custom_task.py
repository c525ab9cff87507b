"""A new task through the public API alone: per-case regression of the tumour grade (LGG 0, HGG 1) of
the embedded BraTS cohort by the MIL model, with its own loss (mean squared error), its own step and its
own metric (``val/mae``). It implements the :class:`losslab.tasks.Task` contract and nothing else (it
inherits no other task), is registered here, in the test (and removed after it), and ``train``,
``evaluate``, ``sweep`` (2 trials), ``compare`` and ``losslab study`` run it end to end in a real MLflow
store; nothing in ``src/`` knows it.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from losslab.data.datasets import BagDataset, collate_padded
from losslab.data.loaders import build_loader
from losslab.engine.steps import ClassificationStep
from losslab.losses import build_loss, register_loss
from losslab.tasks import CaseCacheMixin, FoldSetup, Task, register_task


class GradeMSELoss(nn.Module):
    """Mean squared error of one output ``(B, 1)`` against the grade ``(B,)`` as a number."""

    family = "regression"

    def __init__(self) -> None:
        super().__init__()

    def forward(self, prediction: torch.Tensor, grade: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(prediction[:, 0], grade)


class GradeStep(ClassificationStep):
    """The MIL forward pass of the classifier's step; the grade as a number, its mean absolute error."""

    def target(self, batch, device):
        return batch["label"].to(device).float()

    def loss(self, loss_fn, out, target):
        return loss_fn(out.logits.float(), target)

    def metrics(self, outputs, class_names, loss_fn=None):
        error = np.abs(outputs["logits"][:, 0] - outputs["labels"])
        return {"val/mae": float(error.mean()), "val/loss": float(outputs["loss"])}


class GradeRegressionTask(CaseCacheMixin, Task):
    """The case cache's bags, one output per case: the Task contract and nothing more."""

    name = "test_grade_regression"
    model_kinds = ("mil",)
    loss_tasks = ("regression",)
    headline_metric = "val/mae"

    def output_names(self, cfg, info=None):
        return ["grade"]

    def _dataset(self, cfg, info, rows, train):
        return BagDataset(rows, info.cache_dir, cfg.data.bag_size, "random" if train else "evenly_spaced")

    def test_loader(self, cfg, info, normalizer=None):
        rows = info.index[info.index["fold"] == -1]
        return build_loader(self._dataset(cfg, info, rows, False), cfg.data, False, collate_padded) if len(rows) else None

    def build(self, cfg, names, class_counts=None, fractions=None):
        from losslab.models import build_model

        return build_loss(cfg.loss.name, **cfg.loss.params), build_model(cfg.model, num_outputs=1)

    def step(self, cfg, loss_fn, names):
        return GradeStep()

    def setup_fold(self, cfg, info, fold):
        index = info.index
        train_rows, val_rows = index[(index["fold"] >= 0) & (index["fold"] != fold)], index[index["fold"] == fold]
        loss_fn, model = self.build(cfg, ["grade"])
        train = build_loader(self._dataset(cfg, info, train_rows, True), cfg.data, True, collate_padded)
        val = build_loader(self._dataset(cfg, info, val_rows, False), cfg.data, False, collate_padded)
        return FoldSetup(train, val, loss_fn, model, self.step(cfg, loss_fn, ["grade"]), ["grade"],
                         self.spec(cfg, ["grade"]), {"data.n_train": len(train_rows), "data.n_val": len(val_rows)},
                         tags={"losslab.split_fingerprint": info.split_fingerprint})

    def rebuild(self, cfg, run_tags, run_params):
        loss_fn, model = self.build(cfg, ["grade"])
        return loss_fn, model, ["grade"]

    def spec(self, cfg, names, class_counts=None):
        return {"kind": "classifier", "task": self.name, "model": cfg.model.model_dump(mode="json"),
                "loss": cfg.loss.model_dump(mode="json"), "class_names": list(names)}

    def input_example(self, cfg, val_loader):
        return val_loader.dataset[0]["image"].unsqueeze(0).numpy()

    def split_summary(self, outputs, dataset, names, prefix, intervals=None):
        return {}

    def epoch_figures(self, state, final, names):
        from losslab import plots

        return {"plots/curves.png": plots.plot_curves(state.history, ["train/loss", "val/loss", "val/mae"])}


@pytest.fixture(scope="module")
def grade_task():
    """The loss and the task registered as a user would (the decorators), for this module only: the
    registries are process-wide, and other tests list every registered name."""
    from losslab.losses import registry
    from losslab.tasks import base

    register_loss(key="test_grade_mse")(GradeMSELoss)
    register_task(GradeRegressionTask)
    yield
    registry._loss_registry.pop("test_grade_mse")
    base._TASKS.pop(GradeRegressionTask.name)


@pytest.fixture(scope="module")
def grade_cache(embedded_root, tmp_path_factory):
    from losslab.config import DataConfig
    from losslab.data.cache import build_cache

    cfg = DataConfig(root=str(embedded_root), cache_dir=str(tmp_path_factory.mktemp("cache-grade")), num_folds=3,
                     test_fraction=0.2, salt="test-salt")
    return build_cache(cfg)


def test_a_task_defined_outside_src_trains_evaluates_sweeps_compares_and_studies(grade_task, make_config, grade_cache, tmp_path):
    from losslab.pipelines.compare import run_compare
    from losslab.pipelines.evaluate import run_evaluate
    from losslab.pipelines.sweep import run_sweep, sweep_settings
    from losslab.pipelines.train import run_train

    experiment, name = f"grade-{uuid.uuid4().hex[:6]}", f"grade-model-{uuid.uuid4().hex[:6]}"
    cfg = make_config(f"data.cache_dir={grade_cache.cache_dir}", "data.test_fraction=0.2", "task=test_grade_regression",
                      "loss.name=test_grade_mse", "train.monitor=val/mae", "train.monitor_mode=min",
                      "train.monitor_tiebreak=[val/loss]", "train.max_train_batches=2", "train.device=cpu",
                      f"tracking.registered_model_name={name}", experiment=experiment)
    fold = run_train(cfg, info=grade_cache).folds[0]
    logged = MlflowClient().get_run(fold.run_id).data.metrics
    assert {"best_val/mae", "test/mae", "test/loss"} <= set(logged)

    # evaluate of the registered model (rebuilt by the task from its spec) agrees with train's test/*
    evaluated = run_evaluate(cfg.model_copy(update={"evaluate": {"split": "test"}}),
                             source=f"models:/{name}/{fold.model_version}").metrics
    assert evaluated["test/mae"] == pytest.approx(logged["test/mae"], abs=1e-6)
    assert evaluated["test/loss"] == pytest.approx(logged["test/loss"], abs=1e-6)

    space = {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    sweep_cfg = cfg.model_copy(update={"sweep": {"storage": f"sqlite:///{tmp_path / 'optuna.db'}", "study": experiment,
                                                 "n_trials": 2, "sampler": {"name": "random", "seed": 0},
                                                 "pruner": {"name": "none"}, "space": space}})
    swept = run_sweep(sweep_cfg, sweep_settings(sweep_cfg), info=grade_cache)
    assert swept.trials_run == 2

    compared = run_compare(experiment, metrics=["mae"], log_run=False)
    assert "test_grade_mse" in compared.table.index
    # the pooled runs (like with like: one config) and their best_val/mae as logged, averaged by hand
    client = MlflowClient()
    pooled = [client.get_run(run_id).data.metrics["best_val/mae"] for run_id in compared.runs["run_id"]]
    assert len(pooled) >= 1
    mean_column = next(c for c in compared.table.columns if "mae" in str(c) and "mean" in str(c))
    assert compared.table.loc["test_grade_mse", mean_column] == pytest.approx(np.mean(pooled), abs=1e-6)

    # `losslab study` of two learning rates over two folds, decided on val/mae
    from typer.testing import CliRunner

    from losslab.cli import app
    from losslab.config import dump_yaml

    config = tmp_path / "grade.yaml"
    config.write_text(dump_yaml(cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"log_model": False})})))
    study = tmp_path / "grade_study.yaml"
    study.write_text(f"name: grade-{uuid.uuid4().hex[:6]}\nconfig: {config}\nreference: slow\n"
                     "variants:\n  slow: [optim.lr=0.001]\n  fast: [optim.lr=0.01]\n"
                     "folds: [0, 1]\nseeds: 1\nsplit: val\nmetrics:\n  - {name: mae, direction: minimize}\n")
    result = CliRunner().invoke(app, ["study", "-c", str(study), "--storage", f"sqlite:///{tmp_path / 'study.db'}",
                                      "--no-progress"])
    assert result.exit_code == 0, (result.output, result.exception)
    cells = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                               "tags.`losslab.study_role` = 'cell'")
    assert len(cells) == 4 and all(r.info.status == "FINISHED" and "best_val/mae" in r.data.metrics for r in cells)
