"""Which epoch becomes best.pt: the monitored metric, then the tie-break metrics (val/auc, val/loss)."""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from losslab.config import ConfigError
from losslab.engine import steps
from losslab.engine.checkpoint import load_checkpoint
from losslab.engine.loop import fit, seed_everything
from losslab.engine.monitor import BestModelRule, default_mode
from losslab.pipelines.train import build_components, make_datasets, make_loaders, run_train

RULE = BestModelRule("val/balanced_accuracy", "max", [("val/auc", "max"), ("val/loss", "min")])


def test_default_modes_and_rule_from_config(make_config):
    assert [default_mode(k) for k in ("val/auc", "val/loss", "val/ece", "val/balanced_accuracy")] == \
        ["max", "min", "min", "max"]
    cfg = make_config("train.monitor_tiebreak=[val/f1_macro, {metric: val/auc, mode: min}]")
    assert BestModelRule.from_config(cfg.train).tiebreak == [("val/f1_macro", "max"), ("val/auc", "min")]
    assert BestModelRule.from_config(make_config().train).tiebreak == [("val/auc", "max"), ("val/loss", "min")]
    with pytest.raises(ConfigError, match="monitor_tiebreak"):
        make_config("train.monitor_tiebreak=[{metric: val/auc, mode: up}]")


def test_rule_breaks_ties_in_order_and_keeps_the_earlier_epoch_when_all_tie():
    best = {"val/balanced_accuracy": 0.5, "val/auc": 0.639, "val/loss": 0.70}
    assert RULE.compare({"val/balanced_accuracy": 0.6, "val/auc": 0.1, "val/loss": 9.0}, best) == (True, None)
    assert RULE.compare({"val/balanced_accuracy": 0.4, "val/auc": 0.99, "val/loss": 0.1}, best) == (False, None)
    improved, note = RULE.compare({"val/balanced_accuracy": 0.5, "val/auc": 0.891, "val/loss": 0.9}, best)
    assert improved and note == "tie on val/balanced_accuracy=0.5; val/auc 0.891 > 0.639"
    assert RULE.compare({"val/balanced_accuracy": 0.5, "val/auc": 0.5, "val/loss": 0.1}, best) == (False, None)
    improved, note = RULE.compare({"val/balanced_accuracy": 0.5, "val/auc": 0.639, "val/loss": 0.6}, best)
    assert improved and note.endswith("val/loss 0.6 < 0.7")
    assert RULE.compare(dict(best), best) == (False, None)
    # NaN: a NaN monitor never wins; a NaN AUC (one class in validation) loses to a finite one
    assert RULE.compare({"val/balanced_accuracy": math.nan}, None) == (False, None)
    assert RULE.compare({"val/balanced_accuracy": 0.5, "val/auc": math.nan, "val/loss": 0.1}, best) == (False, None)
    assert RULE.compare({"val/balanced_accuracy": 0.5, "val/auc": 0.2, "val/loss": 0.1},
                        {"val/balanced_accuracy": 0.5, "val/auc": math.nan, "val/loss": 0.7})[0]


# a fabricated history: a one-class model ties at 0.5 for three epochs while its AUC climbs
HISTORY = [{"val/balanced_accuracy": 0.5, "val/auc": 0.639, "val/loss": 0.70},
           {"val/balanced_accuracy": 0.5, "val/auc": 0.891, "val/loss": 0.80},
           {"val/balanced_accuracy": 0.5, "val/auc": 0.891, "val/loss": 0.60},
           {"val/balanced_accuracy": 0.5, "val/auc": 0.700, "val/loss": 0.50}]


def test_fit_keeps_the_tie_broken_epoch_in_best_pt_also_across_a_resume(make_config, small_cache, tmp_path,
                                                                          monkeypatch):
    cfg = make_config("train.device=cpu", "train.max_train_batches=1", f"train.epochs={len(HISTORY)}")
    seed_everything(0)
    train_ds, val_ds = make_datasets(cfg, small_cache, 0)
    loss_fn, model = build_components(cfg, [3, 3])
    tl, vl = make_loaders(cfg, train_ds, val_ds)
    scripted = iter(HISTORY)
    monkeypatch.setattr(steps, "validation_metrics", lambda *args, **kwargs: dict(next(scripted)))
    run_dir = tmp_path / "run"
    # two epochs, then a resumed process for the other two: the rule must remember epoch 1's values
    first = cfg.train.model_copy(update={"checkpoint_dir": str(run_dir), "epochs": 2})
    state = fit(model, loss_fn, tl, vl, first, cfg.optim, small_cache.class_names)
    assert state.best_epoch == 1 and state.best_tiebreak == "tie on val/balanced_accuracy=0.5; val/auc 0.891 > 0.639"
    train_cfg = cfg.train.model_copy(update={"checkpoint_dir": str(run_dir)})
    state = fit(model, loss_fn, tl, vl, train_cfg, cfg.optim, small_cache.class_names, resume_from=run_dir / "last.pt")
    # epoch 2 ties epoch 1 on AUC and beats it on loss; epoch 3 has a lower AUC
    assert state.best_epoch == 2 and state.best_tiebreak == "tie on val/balanced_accuracy=0.5; val/loss 0.6 < 0.8"
    best = load_checkpoint(run_dir / "best.pt")
    assert best["epoch"] == 2 and best["best_values"] == HISTORY[2]
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 3


def test_real_run_ties_every_epoch_and_the_tie_break_picks_the_best_auc(make_config, small_cache):
    """``loss_class_weight/HGG`` is 1.0 at every epoch of plain CE: every epoch ties on the monitor,
    so the kept epoch is the first with the highest val/auc (then the lowest val/loss)."""
    cfg = make_config("train.epochs=3", "train.monitor=loss_class_weight/HGG", "tracking.log_model=false",
                      experiment="tiebreak-real")
    fold = run_train(cfg, info=small_cache).folds[0]
    client = MlflowClient()
    history = {k: [m.value for m in sorted(client.get_metric_history(fold.run_id, k), key=lambda m: m.step)]
               for k in ("val/auc", "val/loss", "loss_class_weight/HGG")}
    assert history["loss_class_weight/HGG"] == [1.0, 1.0, 1.0]
    expected = 0
    for epoch in range(1, 3):  # independent: lexicographic (auc up, loss down), earlier wins on a full tie
        key = (history["val/auc"][epoch], -history["val/loss"][epoch])
        if key > (history["val/auc"][expected], -history["val/loss"][expected]):
            expected = epoch
    run = client.get_run(fold.run_id)
    assert int(run.data.metrics["best_epoch"]) == expected
    if expected:
        assert run.data.tags["losslab.best_tiebreak"].startswith(f"epoch {expected}: tie on loss_class_weight/HGG=1")
    else:
        assert "losslab.best_tiebreak" not in run.data.tags
