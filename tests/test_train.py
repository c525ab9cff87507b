"""End-to-end train runs against a real SQLite MLflow store (no mocks)."""

import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from losslab.engine.checkpoint import load_checkpoint
from losslab.losses import LossBase, register_loss
from losslab.models.export import LogitsOnly
from losslab.pipelines.registry import load_registered_model
from losslab.pipelines.train import build_components, run_train

EPOCH_METRICS = ["train/loss", "val/loss", "val/auc", "val/f1_macro", "val/balanced_accuracy"]


def _history(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _artifact_checkpoint(run_id: str, name: str, dst: Path) -> dict:
    return load_checkpoint(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"checkpoints/{name}",
                                                               dst_path=str(dst)))


def test_short_train_run_logs_everything_and_registers_a_loadable_model(make_config, small_cache, capfd, tmp_path):
    cfg = make_config("train.epochs=2", "tracking.alias=candidate", experiment="train-e2e")
    result = run_train(cfg, info=small_cache)
    fold = result.folds[0]
    client = MlflowClient()
    run = client.get_run(fold.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "ce-f0"
    assert run.data.tags["losslab.loss"] == "ce" and run.data.tags["losslab.fold"] == "0"
    assert run.data.tags["losslab.dataset"] == "brats" and run.data.tags["losslab.entry_point"] == "train"
    for key in EPOCH_METRICS + [f"val/{k}_{c}" for k in ("recall", "pred_count") for c in ("LGG", "HGG")]:
        values = _history(client, fold.run_id, key)
        assert len(values) == 2, key
    # pred counts add up to the validation size every epoch
    n_val = int((small_cache.index["fold"] == 0).sum())
    counts = np.add(_history(client, fold.run_id, "val/pred_count_LGG"), _history(client, fold.run_id, "val/pred_count_HGG"))
    assert counts.tolist() == [n_val, n_val]
    # resolved config as params and as config.yaml
    assert run.data.params["loss.name"] == "ce" and run.data.params["data.bag_size"] == "4"
    artifacts = {a.path for a in client.list_artifacts(fold.run_id)}
    assert "config.yaml" in artifacts
    ckpts = {a.path for a in client.list_artifacts(fold.run_id, "checkpoints")}
    assert ckpts == {"checkpoints/best.pt", "checkpoints/last.pt"}
    assert not (Path(cfg.train.checkpoint_dir) / fold.run_id).exists()  # local copies removed once uploaded
    plots = {a.path for a in client.list_artifacts(fold.run_id, "plots")}
    assert "plots/confusion_matrix.png" in plots

    # the registered version behind the alias belongs to this run and reproduces the best weights
    mv = client.get_model_version_by_alias("test-model", "candidate")
    assert mv.run_id == fold.run_id and f"{mv.version}" == fold.model_version
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registered = load_registered_model("models:/test-model@candidate")
    assert not [w for w in caught if "pickle" in str(w.message).lower()]
    out, err = capfd.readouterr()  # MLflow's "Saving pytorch model by Pickle or CloudPickle ..." warning
    assert "pickle" not in (out + err).lower()
    folder = Path(mlflow.artifacts.download_artifacts("models:/test-model@candidate"))
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert {"MLmodel", "losslab_model.json", "weights.safetensors"} <= files, files
    assert not [f for f in files if f.endswith((".pth", ".pt", ".pkl"))], files  # nothing pickled
    loaded = LogitsOnly(registered.model)
    assert registered.spec["class_names"] == ["LGG", "HGG"] and registered.spec["loss"]["name"] == "ce"
    counts_train = np.bincount(small_cache.index.query("fold != 0")["label"], minlength=2).tolist()
    _, model = build_components(cfg, counts_train)
    best = _artifact_checkpoint(fold.run_id, "best.pt", tmp_path)
    model.load_state_dict(best["model"])
    model.eval()
    x = torch.randn(3, 5, 4, 48, 48)
    with torch.no_grad():
        expected = model(x, None)[0]
        got = loaded(x)
    assert torch.equal(got, expected)  # the same weights through the same code: bit-identical logits
    assert best["epoch"] == int(run.data.metrics["best_epoch"])


_EXPLODE_REGISTERED = False


def _register_exploding_loss():
    global _EXPLODE_REGISTERED
    if _EXPLODE_REGISTERED:
        return

    @register_loss(key="explode_for_test")
    class ExplodingLoss(LossBase):
        family = "classification"

        def forward(self, logits, target):
            raise RuntimeError("boom: the loss exploded on purpose")

    _EXPLODE_REGISTERED = True


def test_run_whose_loss_raises_is_failed_with_its_reason(make_config, small_cache):
    _register_exploding_loss()
    cfg = make_config("loss.name=explode_for_test", experiment="train-failing")
    with pytest.raises(RuntimeError, match="boom"):
        run_train(cfg, info=small_cache)
    client = MlflowClient()
    exp = client.get_experiment_by_name("train-failing")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FAILED"
    assert "boom: the loss exploded on purpose" in run.data.tags["losslab.error"]
    assert run.data.params["loss.name"] == "explode_for_test"  # what it logged before is kept


_NAN_REGISTERED = False


def _register_nan_loss():
    """CE that turns NaN from epoch 1 on (so epoch 0 leaves a good checkpoint)."""
    global _NAN_REGISTERED
    if _NAN_REGISTERED:
        return

    @register_loss(key="nan_from_epoch1_for_test")
    class NanLoss(LossBase):
        family = "classification"

        def __init__(self, reduction: str = "mean"):
            super().__init__(reduction=reduction)
            self.epoch = 0

        def on_epoch_start(self, epoch):
            self.epoch = epoch

        def forward(self, logits, target):
            loss = torch.nn.functional.cross_entropy(logits, target)
            return loss * float("nan") if self.epoch >= 1 and self.training else loss

    _NAN_REGISTERED = True


def test_nan_loss_fails_with_epoch_and_batch_and_keeps_last_good_checkpoint(make_config, small_cache, tmp_path):
    _register_nan_loss()
    cfg = make_config("train.epochs=3", "loss.name=nan_from_epoch1_for_test", experiment="train-nan")
    with pytest.raises(FloatingPointError, match=r"epoch 1, batch 0"):
        run_train(cfg, info=small_cache)
    client = MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("train-nan").experiment_id])[0]
    assert run.info.status == "FAILED" and "non-finite training loss (nan) at epoch 1, batch 0" in run.data.tags["losslab.error"]
    last = _artifact_checkpoint(run.info.run_id, "last.pt", tmp_path)
    assert last["epoch"] == 0 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert "checkpoints/last.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert len(client.get_metric_history(run.info.run_id, "val/balanced_accuracy")) == 1
