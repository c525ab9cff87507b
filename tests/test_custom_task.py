"""A new task through the public API alone: per-case regression of the tumour grade (LGG 0, HGG 1) of
the embedded BraTS cohort by the MIL model, with its own loss (mean squared error) and its own metric
(``val/mae``). It is registered here, in the test (and removed after it), and ``train``, ``evaluate``,
``sweep`` (2 trials) and ``compare`` run it end to end in a real MLflow store; nothing in ``src/`` knows it.
"""

from __future__ import annotations

import dataclasses
import uuid

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from losslab.losses import build_loss, register_loss
from losslab.tasks import BagClassificationTask, register_task


class GradeMSELoss(nn.Module):
    """Mean squared error of one output ``(B, 1)`` against the grade ``(B,)`` as a number."""

    family = "regression"

    def __init__(self) -> None:
        super().__init__()

    def forward(self, prediction: torch.Tensor, grade: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(prediction[:, 0], grade)


class GradeRegressionTask(BagClassificationTask):
    """The MIL bags of the classifier, one output per case, the grade as a number."""

    name = "test_grade_regression"
    model_kinds = ("mil",)
    loss_tasks = ("regression",)
    headline_metric = "val/mae"
    per_case_probabilities = False  # evaluate scores it; no calibration, TTA or per-class intervals

    def build(self, cfg, names, class_counts=None, fractions=None):
        from losslab.models import build_model

        return build_loss(cfg.loss.name, **cfg.loss.params), build_model(cfg.model, num_outputs=1)

    def target(self, batch, device):
        return batch["label"].to(device).float()

    def loss(self, loss_fn, out, target):
        return loss_fn(out.logits.float(), target)

    def metrics(self, outputs, class_names, loss_fn=None):
        error = np.abs(outputs["logits"][:, 0] - outputs["labels"])
        return {"val/mae": float(error.mean()), "val/loss": float(outputs["loss"])}

    def split_summary(self, outputs, dataset, names, prefix, intervals=None):
        return {}

    def setup_fold(self, cfg, info, fold):
        from losslab import plots

        def curves(state, final):
            return {"plots/curves.png": plots.plot_curves(state.history, ["train/loss", "val/loss", "val/mae"])}

        return dataclasses.replace(super().setup_fold(cfg, info, fold), figures=curves)


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


def test_a_task_defined_outside_src_trains_evaluates_sweeps_and_compares(grade_task, make_config, grade_cache, tmp_path):
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
