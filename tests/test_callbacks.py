"""Each training callback alone (the behaviours fit() switches on from train.*), with its state_dict
round trip; fit() wiring is covered by test_engine_features, test_resume and test_best_checkpoint."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from losslab.engine.callbacks import (EMA, SWA, AlarmMonitor, Callback, CallbackList, EarlyStopping, FreezeBackbone,
                                      ModelCheckpoint, training_callbacks)
from losslab.engine.checkpoint import CheckpointWriter
from losslab.engine.checkpoint import load_checkpoint
from losslab.engine.loop import FitState
from losslab.engine.monitor import BestModelRule


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
        self.head = nn.Linear(3, 2)


def _run(model, **extra):
    return SimpleNamespace(model=model, distributed=False, is_main=True, device=torch.device("cpu"), step=None,
                           cbs=CallbackList([]), step_scheduler=True, **extra)


def _state(run, epoch=0, tmp_path=None):
    return FitState(epoch=epoch, run=run, checkpoint_dir=Path(tmp_path) if tmp_path else None)


def test_freeze_backbone_for_the_first_epochs_then_train_it():
    model = _Net().train()
    cb = FreezeBackbone(2)
    run = _run(model)
    cb.setup(run)
    cb.on_train_epoch_start(_state(run, epoch=1))
    assert not any(p.requires_grad for p in model.backbone.parameters()) and not model.backbone[1].training
    assert all(p.requires_grad for p in model.head.parameters())
    model.train()
    cb.on_train_epoch_start(_state(run, epoch=2))
    assert all(p.requires_grad for p in model.backbone.parameters()) and model.backbone[1].training
    with pytest.raises(ValueError, match="freeze_backbone_epochs=2 is not supported under torchrun"):
        cb.setup(SimpleNamespace(distributed=True))


def test_ema_follows_decay_and_restores_from_its_state_dict():
    model = nn.Linear(1, 1, bias=False)
    cb = EMA(0.75)
    run = _run(model)
    cb.setup(run)
    state = _state(run)
    with torch.no_grad():
        model.weight.fill_(2.0)
    cb.on_train_batch_end(state, 0, 0.0)  # the first update copies the weights
    with torch.no_grad():
        model.weight.fill_(6.0)
    cb.on_train_batch_end(state, 1, 0.0)
    module, source = cb.validation_model(state)
    assert source == "ema" and module.weight.item() == pytest.approx(0.75 * 2.0 + 0.25 * 6.0)
    fresh = EMA(0.75)
    fresh.setup(_run(nn.Linear(1, 1, bias=False)))
    fresh.load_state_dict(cb.state_dict())
    assert fresh.validation_model(state)[0].weight.item() == pytest.approx(3.0)


def _swa_run(model):
    optimizer = torch.optim.SGD([{"params": model.parameters(), "name": "head"}], lr=0.1)
    cfg = SimpleNamespace(swa_lr=0.04, max_train_batches=None)
    return _run(model, optimizer=optimizer, train_cfg=cfg, optim_cfg=SimpleNamespace(lr=0.1, backbone_lr=None),
                train_loader=[])


def test_swa_averages_the_last_epochs_at_a_constant_lr_and_resumes():
    model = nn.Linear(1, 1, bias=False)
    run = _swa_run(model)
    cb = SWA(epochs=2, total_epochs=3)
    cb.setup(run)
    cb.on_epoch_start(_state(run, 0))
    assert run.step_scheduler and cb.validation_model(_state(run, 0)) is None and cb.state_dict()["swa"] is None
    for epoch, weight in ((1, 1.0), (2, 5.0)):
        cb.on_epoch_start(_state(run, epoch))
        assert not run.step_scheduler and run.optimizer.param_groups[0]["lr"] == pytest.approx(0.04)
        with torch.no_grad():
            model.weight.fill_(weight)
        cb.on_train_epoch_end(_state(run, epoch))
        if epoch == 1:
            saved = copy.deepcopy(cb.state_dict())  # a checkpoint serialises it at once
    module, source = cb.validation_model(_state(run, 2))
    assert source == "swa" and module.weight.item() == pytest.approx(3.0)  # (1 + 5) / 2
    resumed_model = nn.Linear(1, 1, bias=False)
    resumed_run = _swa_run(resumed_model)
    resumed = SWA(epochs=2, total_epochs=3)
    resumed.setup(resumed_run)
    resumed.load_state_dict(saved)
    resumed.on_epoch_start(_state(resumed_run, 2))
    with torch.no_grad():
        resumed_model.weight.fill_(5.0)
    resumed.on_train_epoch_end(_state(resumed_run, 2))
    assert resumed.validation_model(_state(resumed_run, 2))[0].weight.item() == pytest.approx(3.0)
    assert resumed.scheduler.state_dict() == cb.scheduler.state_dict()


class _Alarms(Callback):
    def __init__(self):
        self.names = []

    def on_alarm(self, state, alarm):
        self.names.append(alarm.name)


def _train_cfg(**kw):
    base = dict(dead_class_patience=2, loss_gap_threshold=0.5, bal_acc_var_window=5, bal_acc_var_threshold=0.01,
                monitor="val/x", monitor_mode="max", early_stopping_patience=None, freeze_backbone_epochs=0,
                swa_epochs=0, ema_decay=None, epochs=3, monitor_tiebreak=[])
    return SimpleNamespace(**(base | kw), tiebreak_rules=lambda: [])


def test_alarm_monitor_fires_once_and_replays_history_silently_on_resume():
    dead = {"val/pred_count_a": 4.0, "val/pred_count_b": 0.0}
    recorder = _Alarms()
    run = SimpleNamespace(cbs=CallbackList([recorder]))
    cb = AlarmMonitor(_train_cfg())
    for epoch in range(3):
        cb.on_validation_end(FitState(epoch=epoch, run=run), dead)
    assert recorder.names == ["dead_class"]
    resumed_recorder = _Alarms()
    resumed = AlarmMonitor(_train_cfg())
    resumed.load_state_dict({"history": {k: [v, v] for k, v in dead.items()}})
    resumed.on_validation_end(FitState(epoch=2, run=SimpleNamespace(cbs=CallbackList([resumed_recorder]))), dead)
    assert resumed_recorder.names == []  # it fired before the resume


def test_early_stopping_counts_epochs_without_a_new_best_and_resumes():
    rule = BestModelRule("val/x", "max")
    cb = EarlyStopping(2, rule)
    states = [FitState(epoch=e) for e in range(4)]
    for state, value in zip(states, (0.5, 0.6, 0.6, 0.4)):
        cb.on_validation_end(state, {"val/x": value})
    assert [s.stopped_early for s in states] == [False, False, False, True]
    resumed = EarlyStopping(2, rule)
    resumed.load_state_dict({"patience_left": 1, "best_values": {"val/x": 0.6}})
    state = FitState(epoch=3)
    resumed.on_validation_end(state, {"val/x": 0.6})  # a tie is no improvement
    assert state.stopped_early and resumed.state_dict() == {"patience_left": 0}
    never = EarlyStopping(None, rule)
    for e in range(5):
        never.on_validation_end(FitState(epoch=e), {"val/x": 0.1})
    assert never.patience_left is None


def test_model_checkpoint_writes_best_only_on_improvement(tmp_path):
    rule = BestModelRule("val/x", "max", [("val/auc", "max")])
    cb = ModelCheckpoint(rule)
    kinds = []

    class _Kinds(Callback):
        def on_checkpoint(self, state, path, kind):
            kinds.append((state.epoch, kind, Path(path).name))

    run = SimpleNamespace(cbs=CallbackList([_Kinds()]), payload=lambda state: {"epoch": state.epoch},
                          writer=CheckpointWriter())
    for epoch, metrics in enumerate([{"val/x": 0.5, "val/auc": 0.6}, {"val/x": 0.5, "val/auc": 0.9},
                                     {"val/x": 0.4, "val/auc": 1.0}]):
        state = FitState(epoch=epoch, run=run, checkpoint_dir=tmp_path,
                         best_values={"val/x": 0.5, "val/auc": 0.6} if epoch else None,
                         best_metric=0.5 if epoch else None)
        cb.on_validation_end(state, metrics)
        cb.write(state)
        # on_checkpoint follows the write: epoch e's comes when epoch e + 1 submits (or the writer closes)
        assert [k[0] for k in kinds] == [e for e in range(epoch) for _ in range(1 + (e < 2))]
    run.writer.close()
    assert kinds == [(0, "best", "best.pt"), (0, "last", "last.pt"), (1, "best", "best.pt"), (1, "last", "last.pt"),
                     (2, "last", "last.pt")]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1 and load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    with pytest.raises(KeyError, match="train.monitor 'val/x' is not a logged metric"):
        cb.on_validation_end(FitState(epoch=3, run=run, checkpoint_dir=tmp_path), {"val/auc": 1.0})


def test_training_callbacks_follow_the_config_in_order():
    names = [type(c).__name__ for c in training_callbacks(_train_cfg(freeze_backbone_epochs=1, swa_epochs=1,
                                                                     ema_decay=0.9, early_stopping_patience=3))]
    assert names == ["FreezeBackbone", "SWA", "EMA", "AlarmMonitor", "ModelCheckpoint", "EarlyStopping"]
    assert [type(c).__name__ for c in training_callbacks(_train_cfg())] == ["AlarmMonitor", "ModelCheckpoint",
                                                                            "EarlyStopping"]


def test_ema_update_without_host_reads_equals_torchs_averaged_model():
    from losslab.engine.ema import build_ema, update_ema

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))  # parameters, float and integer buffers
    reference, ours = build_ema(model, 0.9), build_ema(model, 0.9)
    for i in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(2, 2, 5, 5))
        reference.update_parameters(model)
        update_ema(ours, model, 0.9, first=i == 0)
    for (name, expected), (_, got) in zip(reference.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(got, expected), name
