"""The task registry: inference from model.kind, and impossible pairings of task, model kind and loss
refused when the config is loaded (naming the keys and the file), before any MLflow run opens."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from losslab.config import ConfigError, load_config
from losslab.engine.steps import StepOutput
from losslab.tasks import TaskError, get_task, list_tasks, task_of, task_of_kind


def _yaml(tmp_path, body: dict):
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_registry_names_and_inference_from_model_kind(make_config):
    assert list_tasks() == ["bag_classification", "image_classification", "multitask", "segmentation",
                            "volume_classification"]
    assert task_of_kind() == {"mil": "bag_classification", "slices25d": "bag_classification", "image": "image_classification",
                            "volume3d": "volume_classification", "multimodal": "multitask",
                            "segmentation": "segmentation"}
    assert task_of(make_config()).name == "bag_classification"
    assert task_of(make_config("model.kind=volume3d", "model.backbone=monai_resnet10")).name == "volume_classification"
    assert task_of(make_config("task=bag_classification")).name == "bag_classification"
    with pytest.raises(TaskError, match="unknown task 'nope'; known tasks: bag_classification, "):
        get_task("nope")


def test_refuses_a_segmentation_loss_on_a_classifier(tmp_path):
    path = _yaml(tmp_path, {"loss": {"name": "dice"}, "model": {"kind": "mil"}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert f"loss.name='dice' (in {path.resolve()}) is a segmentation loss" in msg
    assert "task 'bag_classification' (model.kind='mil'" in msg and "takes classification or ordinal losses" in msg


def test_refuses_a_compound_loss_with_a_segmentation_term_on_a_classifier(make_config):
    with pytest.raises(ConfigError, match="loss.name='dice' .*is a segmentation loss"):
        make_config("loss=compound_seg")


def test_refuses_a_distillation_loss_outside_distill(tmp_path):
    path = _yaml(tmp_path, {"loss": {"name": "kd"}})
    with pytest.raises(ConfigError, match=rf"loss.name='kd' \(in {path.resolve()}\) is a distillation loss: "
                                          r"it runs only in `losslab distill`"):
        load_config(path)


def test_refuses_an_ordinal_loss_on_a_segmentation_task(tmp_path):
    path = _yaml(tmp_path, {"task": "segmentation", "loss": {"name": "coral"}})
    with pytest.raises(ConfigError, match=rf"loss.name='coral' \(in {path.resolve()}\) is a ordinal loss; "
                                          r"task 'segmentation'.* takes segmentation losses"):
        load_config(path)


def test_refuses_a_classifier_model_on_the_segmentation_task(tmp_path):
    path = _yaml(tmp_path, {"task": "segmentation", "loss": {"name": "dice"}, "model": {"kind": "mil"}})
    with pytest.raises(ConfigError, match=rf"task='segmentation' \(in {path.resolve()}\) cannot train "
                                          r"model.kind='mil'.*its model kinds: segmentation"):
        load_config(path)


def test_refuses_a_model_kind_the_named_task_does_not_train(make_config):
    with pytest.raises(ConfigError, match=r"task='volume_classification' \(in command-line override "
                                          r"'task=volume_classification'\) cannot train model.kind='mil'"):
        make_config("task=volume_classification")


def test_refuses_an_unknown_task_and_an_unknown_loss_at_load_time(make_config):
    with pytest.raises(ConfigError, match="unknown task 'volumes'"):
        make_config("task=volumes")
    with pytest.raises(ConfigError, match="unknown loss 'focall'; known losses: "):
        make_config("loss.name=focall")


def test_cli_refuses_before_any_mlflow_run_opens(tmp_path, mlflow_store):
    path = _yaml(tmp_path, {"loss": {"name": "tversky"}, "tracking": {"experiment": "refused-pairing"}})
    proc = subprocess.run([sys.executable, "-m", "losslab.cli", "train", "-c", str(path)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "loss.name='tversky'" in proc.stderr and str(path.resolve()) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert MlflowClient().get_experiment_by_name("refused-pairing") is None


def test_multitask_is_refused_by_train_before_a_run_opens(make_config):
    from losslab.pipelines.train import run_train

    cfg = make_config("model.kind=multimodal", experiment="multitask-train")
    with pytest.raises(TaskError, match=r"task 'multitask' does not run through `losslab train`; it runs through: distill"):
        run_train(cfg)
    assert MlflowClient().get_experiment_by_name("multitask-train") is None


def test_bag_task_averages_the_dual_stream_losses_and_reports_selection_confidence():
    task = get_task("bag_classification").step(None, torch.nn.CrossEntropyLoss(), ["a", "b"])
    logits, streams = torch.tensor([[2.0, 0.0]]), [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])]
    target = torch.tensor([0])
    got = task.loss(torch.nn.CrossEntropyLoss(), StepOutput(logits, None, {"stream_logits": streams}), target)
    expected = (torch.nn.functional.cross_entropy(streams[0], target) + torch.nn.functional.cross_entropy(streams[1], target)) / 2
    torch.testing.assert_close(got, expected)
    instance = torch.tensor([[[0.0, 2.0], [0.0, 0.0]]])  # instance 0 is the critical one: p(pos) = sigmoid(2)
    diag = task.batch_diagnostics(StepOutput(logits, None, {"instance_logits": instance}), {"mask": torch.ones(1, 2, dtype=torch.bool)})
    assert diag["selection_confidence"] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
    volume_step = get_task("volume_classification").step(None, torch.nn.CrossEntropyLoss(), ["a", "b"])
    assert volume_step.batch_diagnostics(StepOutput(logits), {}) == {}


def test_train_data_on_device_is_refused_at_load_time_where_it_cannot_apply():
    """Segmentation and 2.5D stacks have no device-side batches, and a gathered batch is never augmented:
    each is refused when the config loads, naming the key; a bag classifier without augmentation loads."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs" / "experiment"
    assert load_config(root / "demo.yaml", ["data.train_data_on_device=true", "data.augment={}"]).data.train_data_on_device
    for config, extra in (("seg_dice.yaml", []), ("rsna_lumbar_v8.yaml", [])):
        with pytest.raises(ConfigError, match=r"data\.train_data_on_device=true.*model\.kind=(segmentation|slices25d)"):
            load_config(root / config, ["data.train_data_on_device=true", *extra])
    with pytest.raises(ConfigError, match=r"data\.train_data_on_device=true.*data\.augment="):
        load_config(root / "demo.yaml", ["data.train_data_on_device=true", "data.augment={brightness: 0.1}"])
