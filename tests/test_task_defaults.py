"""Defaults that follow the task: a config that names no monitor, tie-breaks or registered model name gets
its task's (segmentation picks its best epoch by mean Dice and registers ``losslab-seg``); a config that
names them keeps its own."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEG_PARTS = ["data=embedded_brats_seg", "model=seg_unet", "loss=dice"]


@pytest.mark.parametrize("overrides, monitor, tiebreak, name", [
    (SEG_PARTS, "val/mean_dice", ["val/loss"], "losslab-seg"),
    (["model.kind=image", "model.backbone=lenet_mil"], "val/balanced_accuracy", ["val/auc", "val/loss"], "losslab-image"),
    ([], "val/balanced_accuracy", ["val/auc", "val/loss"], "losslab-mil"),
])
def test_unset_settings_take_the_task_default(overrides, monitor, tiebreak, name):
    from losslab.config import load_config

    cfg = load_config(None, overrides)
    assert (cfg.train.monitor, cfg.train.monitor_mode) == (monitor, "max")
    assert cfg.train.monitor_tiebreak == tiebreak
    assert cfg.tracking.registered_model_name == name


def test_settings_a_config_names_are_kept():
    from losslab.config import load_config

    cfg = load_config(None, SEG_PARTS + ["train.monitor=val/loss", "train.monitor_mode=min",
                                         "tracking.registered_model_name=my-unet"])
    assert (cfg.train.monitor, cfg.train.monitor_mode, cfg.tracking.registered_model_name) == ("val/loss", "min", "my-unet")
    demo = load_config(REPO / "configs" / "experiment" / "demo.yaml")
    assert demo.tracking.registered_model_name == "losslab-brats-mil"  # the file's own


def test_a_segmentation_config_without_a_monitor_keeps_its_best_dice_epoch(tmp_path_factory, tmp_path):
    """Before, such a config monitored val/balanced_accuracy, which segmentation never logs: no epoch
    ever became best. Now the best checkpoint is the epoch of the highest validation mean Dice."""
    from mlflow.tracking import MlflowClient

    from _data_factories import generate_embedded_brats
    from losslab.config import load_config
    from losslab.pipelines.train import run_train

    root = generate_embedded_brats(tmp_path_factory, "defaults", seed=2, num_cases=6, shape=(24, 24, 8))
    cfg = load_config(None, SEG_PARTS + [
        f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.num_folds=2", "data.test_fraction=0",
        "data.salt=defaults", "data.batch_size=2", "seg.patch_size=[16, 16, 8]", "seg.samples_per_case=1",
        "train.epochs=3", "optim.lr=0.01", f"train.checkpoint_dir={tmp_path / 'ckpt'}",
        "tracking.experiment=task-defaults"])
    result = run_train(cfg)
    run_id = result.folds[0].run_id
    client = MlflowClient()
    history = [m.value for m in client.get_metric_history(run_id, "val/mean_dice")]
    metrics = client.get_run(run_id).data.metrics
    assert len(history) == 3
    assert metrics["best_val/mean_dice"] == pytest.approx(max(history), abs=1e-6)
    versions = client.search_model_versions(f"run_id='{run_id}'")
    assert [v.name for v in versions] == ["losslab-seg"]
