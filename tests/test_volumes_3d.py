"""3D whole-volume classification on the tiny embedded BraTS cohort: the dataset hands a 3D model
(B, 4, D, H, W); train through the CLI logs per-class metrics, checkpoints and a registered model;
evaluate (with calibration and TTA) scores it; a resumed 3D run ends like an uninterrupted one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from losslab.config import dump_yaml, load_config
from losslab.engine.callbacks import Callback
from losslab.engine.checkpoint import load_checkpoint
from losslab.engine.loop import fit, seed_everything
from losslab.pipelines.registry import load_registered_model
from losslab.pipelines.train import build_components, make_datasets, make_loaders
from losslab.tasks import task_of

REPO = Path(__file__).resolve().parents[1]
VOLUME = ("model.kind=volume3d", "model.backbone=monai_resnet10", "model.head_kwargs={}", "data.volume_depth=8",
          "train.device=cpu")


def test_volume_dataset_is_the_case_slices_transposed_and_resampled(make_config, small_cache):
    cfg = make_config(*VOLUME)
    train_ds, val_ds = make_datasets(cfg, small_cache, 0)
    item = val_ds[0]
    raw = np.load(Path(small_cache.cache_dir) / val_ds.index.iloc[0]["array_path"])  # (D, C, H, W)
    assert item["image"].shape == (4, 8) + raw.shape[2:]
    # independent: per-channel z-score over non-zero voxels, then linear interpolation along depth
    row = val_ds.index.iloc[0]
    mean = np.asarray(row["channel_mean"])[None, :, None, None]
    std = np.asarray(row["channel_std"])[None, :, None, None]
    z = np.where(raw != 0, (raw - mean) / std, 0.0).transpose(1, 0, 2, 3)
    expected = torch.nn.functional.interpolate(torch.as_tensor(z, dtype=torch.float32)[None], size=(8,) + raw.shape[2:],
                                               mode="trilinear", align_corners=False)[0]
    torch.testing.assert_close(item["image"], expected, rtol=1e-5, atol=1e-5)
    batch = task_of(cfg).collate([val_ds[0], val_ds[1]])
    assert batch["image"].shape == (2, 4, 8) + raw.shape[2:] and "mask" not in batch


def test_train_3d_through_the_cli_then_evaluate_with_calibration_and_tta(make_config, small_cache, tmp_path):
    from losslab.pipelines.evaluate import run_evaluate

    cfg = make_config(*VOLUME, "tracking.registered_model_name=test-resnet3d", experiment="volume3d-cli")
    path = tmp_path / "resnet3d.yaml"
    path.write_text(dump_yaml(cfg))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, "-m", "losslab.cli", "train", "-c", str(path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    exp = client.get_experiment_by_name("volume3d-cli")
    (run,) = client.search_runs([exp.experiment_id])
    for cls in small_cache.class_names:
        for key in (f"val/recall_{cls}", f"val/pred_count_{cls}"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1], key
    counts = sum(client.get_metric_history(run.info.run_id, f"val/pred_count_{c}")[-1].value for c in small_cache.class_names)
    assert counts == int((small_cache.index["fold"] == 0).sum())
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} == {"checkpoints/best.pt",
                                                                                      "checkpoints/last.pt"}
    assert run.data.tags["losslab.model"] == "volume3d:monai_resnet10:attention"
    # the registered model reproduces the best checkpoint on a whole volume (B, 4, D, H, W)
    registered = load_registered_model("models:/test-resnet3d@candidate")
    assert registered.spec["model"]["kind"] == "volume3d"
    _, model = build_components(cfg, [1, 1])
    best_pt = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="checkpoints/best.pt",
                                                  dst_path=str(tmp_path / "best"))  # the local copy is removed
    model.load_state_dict(load_checkpoint(best_pt)["model"])
    model.eval()
    x = torch.randn(2, 4, 8, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(registered.model(x)[0], model(x)[0])

    settings = {"split": "val", "fold": 0, "tta": {"passes": 1}, "latency": {"enabled": True, "repeats": 2, "warmup": 1}}
    result = run_evaluate(cfg.model_copy(update={"evaluate": settings}), source="models:/test-resnet3d@candidate")
    best = client.get_run(run.info.run_id).data.metrics
    assert result.metrics["test/auc"] == pytest.approx(best["best_val/auc"], abs=1e-6)
    for key in ("test_calibrated/balanced_accuracy", "test_tta/balanced_accuracy", "latency/p50_ms"):
        assert np.isfinite(result.metrics[key]), key


class _Interrupt(RuntimeError):
    pass


class _StopAt(Callback):
    def on_epoch_start(self, state):
        if state.epoch == 1:
            raise _Interrupt("stopped at epoch 1")


def _fit3d(cfg, info, ckpt_dir, callbacks=None, resume_from=None):
    seed_everything(cfg.train.seed, True)
    train_ds, val_ds = make_datasets(cfg, info, 0)
    loss_fn, model = build_components(cfg, np.bincount(train_ds.labels, minlength=2).tolist())
    tl, vl = make_loaders(cfg, train_ds, val_ds)
    train_cfg = cfg.train.model_copy(update={"checkpoint_dir": str(ckpt_dir)})
    return fit(model, loss_fn, tl, vl, train_cfg, cfg.optim, info.class_names, callbacks=callbacks,
               resume_from=resume_from, step=task_of(cfg).step(cfg, loss_fn, info.class_names))


def test_resumed_3d_run_matches_the_uninterrupted_one(make_config, small_cache, tmp_path):
    cfg = make_config(*VOLUME, "train.epochs=2", "train.max_train_batches=2", "train.ema_decay=0.9")
    reference = _fit3d(cfg, small_cache, tmp_path / "ref")
    with pytest.raises(_Interrupt):
        _fit3d(cfg, small_cache, tmp_path / "cut", callbacks=[_StopAt()])
    resumed = _fit3d(cfg, small_cache, tmp_path / "cut", resume_from=tmp_path / "cut" / "last.pt")
    keys = [k for k in reference.history if k.startswith("val/")]
    assert "val/auc" in keys
    for key in keys:
        assert resumed.history[key] == pytest.approx(reference.history[key], abs=1e-6, nan_ok=True), key
    a, b = load_checkpoint(tmp_path / "ref" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-6, msg=k)


def test_densenet_input_rule_matches_a_real_forward_pass():
    """input_shape_problem says a size fails exactly when MONAI's DenseNet fails on it."""
    from losslab.models.volumes import create_volume_encoder, input_shape_problem

    encoder = create_volume_encoder("monai_densenet121", in_chans=1).eval()
    for depth in (16, 24, 28, 29, 32):
        try:
            with torch.no_grad():
                encoder(torch.zeros(1, 1, depth, 32, 32))
            works = True
        except RuntimeError:
            works = False
        assert (input_shape_problem("monai_densenet121", (depth, 32, 32)) is None) == works, depth
    assert "at least 29 voxels" in input_shape_problem("monai_densenet121", (8, 48, 48))
    assert input_shape_problem("swinunetr", (8, 48, 48)) is None and input_shape_problem("monai_resnet10", (1, 5, 5)) is None


def test_volume_size_resamples_in_plane_and_a_too_small_volume_is_refused(make_config, small_cache):
    from losslab.tasks import TaskError

    cfg = make_config(*VOLUME[:-2], "data.volume_depth=6", "data.volume_size=[32, 40]")
    train_ds, val_ds = make_datasets(cfg, small_cache, 0)
    raw = np.load(Path(small_cache.cache_dir) / val_ds.index.iloc[0]["array_path"])  # (D, C, H, W)
    item = val_ds[0]["image"]
    assert item.shape == (4, 6, 32, 40)
    row = val_ds.index.iloc[0]
    mean = np.asarray(row["channel_mean"])[None, :, None, None]
    std = np.asarray(row["channel_std"])[None, :, None, None]
    z = np.where(raw != 0, (raw - mean) / std, 0.0).transpose(1, 0, 2, 3)
    expected = torch.nn.functional.interpolate(torch.as_tensor(z, dtype=torch.float32)[None], size=(6, 32, 40),
                                               mode="trilinear", align_corners=False)[0]
    torch.testing.assert_close(item, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(TaskError, match=r"model.backbone=monai_densenet121 cannot take the volumes \(D, H, W\) = "
                                        r"\(8, 48, 48\): .* set data.volume_depth and data.volume_size"):
        make_datasets(make_config(*VOLUME, "model.backbone=monai_densenet121"), small_cache, 0)


@pytest.mark.parametrize("backbone, extra", [("monai_densenet121", ()),
                                             ("swinunetr", ("model.backbone_kwargs={feature_size: 12}",))])
def test_densenet_and_swinunetr_train_as_cv_folds_and_register(make_config, small_cache, tmp_path, backbone, extra):
    """The other 3D encoders train end to end: cv.folds as child runs, checkpoints, a registered model
    that gives the best checkpoint's logits."""
    from losslab.pipelines.train import run_train

    name = f"test-{backbone}"
    cfg = make_config("model.kind=volume3d", f"model.backbone={backbone}", "model.head_kwargs={}", *extra,
                      "data.volume_depth=32", "data.volume_size=[32, 32]", "train.epochs=1", "cv.folds=[0, 1]",
                      f"tracking.registered_model_name={name}", experiment=f"volume3d-{backbone}")
    result = run_train(cfg, info=small_cache)
    assert result.parent_run_id and [f.fold for f in result.folds] == [0, 1]
    client = MlflowClient()
    for fold in result.folds:
        run = client.get_run(fold.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert run.data.tags["losslab.model"].startswith(f"volume3d:{backbone}")
        counts = sum(run.data.metrics[f"val/pred_count_{c}"] for c in small_cache.class_names)
        assert counts == int((small_cache.index["fold"] == fold.fold).sum())
    last = result.folds[-1]
    registered = load_registered_model(f"models:/{name}/{last.model_version}")
    assert registered.spec["model"]["backbone"] == backbone
    _, model = build_components(cfg, list(registered.spec["class_counts"]))
    best_pt = mlflow.artifacts.download_artifacts(run_id=last.run_id, artifact_path="checkpoints/best.pt",
                                                  dst_path=str(tmp_path / "best"))
    model.load_state_dict(load_checkpoint(best_pt)["model"])
    registered.model.eval()
    model.eval()
    x = torch.randn(2, 4, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(registered.model(x)[0], model(x)[0])


def test_sweep_over_a_3d_model_runs_each_trial_as_a_child_run(make_config, small_cache, tmp_path):
    """A 3D model goes through `losslab sweep` like any classifier: one MLflow child run per trial,
    the trial's value equal to its run's best validation balanced accuracy."""
    import optuna

    from losslab.pipelines.sweep import run_sweep, sweep_settings

    cfg = make_config(*VOLUME, "train.epochs=1", experiment="volume3d-sweep")
    space = {"loss": {"type": "categorical", "choices": ["ce", "focal"]},
             "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    settings = {"storage": f"sqlite:///{tmp_path / 'optuna.db'}", "study": "volume3d-sweep", "n_trials": 2,
                "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"}, "space": space}
    cfg = cfg.model_copy(update={"sweep": settings})
    result = run_sweep(cfg, sweep_settings(cfg), info=small_cache)
    study = optuna.load_study(study_name="volume3d-sweep", storage=settings["storage"])
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"] and result.trials_run == 2
    client = MlflowClient()
    experiment = client.get_experiment_by_name("volume3d-sweep").experiment_id
    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        (fold_run,) = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        assert fold_run.data.tags["losslab.model"].startswith("volume3d:monai_resnet10")
        assert fold_run.data.tags["losslab.loss"] == trial.params["loss"]
        assert trial.value == pytest.approx(fold_run.data.metrics["best_val/balanced_accuracy"])
        assert run.data.metrics["objective"] == pytest.approx(trial.value)
