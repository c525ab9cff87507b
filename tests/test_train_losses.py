"""A short train run for every classification loss on the embedded data (issue 3)."""

import math

import pytest
from mlflow.tracking import MlflowClient

from losslab.losses import get_loss_class, list_losses
from losslab.pipelines.train import run_train

CLASSIFICATION = sorted(n for n in list_losses() if get_loss_class(n).family in ("classification", "ordinal"))


def _history(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_every_classification_loss_is_covered():
    assert {"ce", "focal", "ldam", "logit_adjusted", "balanced_softmax", "coral", "corn"} <= set(CLASSIFICATION)


@pytest.mark.parametrize("loss", [n for n in CLASSIFICATION if n not in ("explode_for_test", "nan_from_epoch1_for_test")])
def test_short_train_run_for_each_classification_loss(loss, make_config, small_cache):
    cfg = make_config(f"loss={loss}", "train.epochs=2", "tracking.log_model=false", experiment="losses-train")
    result = run_train(cfg, info=small_cache)
    fold = result.folds[0]
    client = MlflowClient()
    run = client.get_run(fold.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["losslab.loss"] == loss
    losses = _history(client, fold.run_id, "train/loss")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    counts = _history(client, fold.run_id, "val/pred_count_LGG")
    assert len(counts) == 2


def test_ldam_drw_crosses_its_switch_epoch(make_config, small_cache):
    cfg = make_config("loss=ldam", "loss.drw_start_epoch=1", "train.epochs=3", "tracking.log_model=false",
                      experiment="losses-train")
    fold = run_train(cfg, info=small_cache).folds[0]
    client = MlflowClient()
    lgg = _history(client, fold.run_id, "loss_class_weight/LGG")
    hgg = _history(client, fold.run_id, "loss_class_weight/HGG")
    assert lgg[0] == 1.0 and hgg[0] == 1.0  # no weights before the switch
    # from epoch 1 on: effective-number weights, the rare class (LGG) heavier, summing to K = 2
    assert lgg[1] > 1.0 > hgg[1] and lgg[1] + hgg[1] == pytest.approx(2.0)
    assert lgg[2] == pytest.approx(lgg[1])


def test_compound_with_learnable_weights_logs_changing_weights(make_config, small_cache):
    cfg = make_config("loss=compound", "train.epochs=3", "tracking.log_model=false", experiment="losses-train")
    fold = run_train(cfg, info=small_cache).folds[0]
    client = MlflowClient()
    run = client.get_run(fold.run_id)
    weight_keys = sorted(k for k in run.data.metrics if k.startswith("loss_weight/"))
    assert len(weight_keys) >= 2
    for key in weight_keys:
        values = _history(client, fold.run_id, key)
        assert len(values) == 3
        assert max(values) - min(values) > 1e-6, f"{key} did not change: {values}"
    total = [sum(_history(client, fold.run_id, k)[e] for k in weight_keys) for e in range(3)]
    assert total == pytest.approx([1.0, 1.0, 1.0])  # learnable_softmax weights stay normalised
    term_keys = [k for k in run.data.metrics if k.startswith("train/loss_")]
    assert len(term_keys) == len(weight_keys)
