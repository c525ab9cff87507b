"""The engine's training features on the tiny cohort, without MLflow: LR schedule, backbone freezing
and param-group LRs, EMA, SWA (+ BN update), mixup, early stopping on any metric."""

from __future__ import annotations

import errno
import math
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from losslab.config import ConfigError
from losslab.engine import checkpoint
from losslab.engine.callbacks import Callback
from losslab.engine.ema import update_bn
from losslab.engine.steps import ClassificationStep
from losslab.engine.checkpoint import CheckpointDiskFullError
from losslab.engine.callbacks import NonFiniteWeightsError
from losslab.engine.checkpoint import evaluation_weights, load_checkpoint
from losslab.engine.loop import NonFiniteLossError, compute_mixed_loss, cosine_with_warmup, fit, seed_everything
from losslab.engine.steps import predict
from losslab.engine.steps import StepOutput
from losslab.pipelines.train import build_components, make_datasets, make_loaders


STEPS = 2  # training batches per epoch (of 5): keeps each test a few seconds on 2 busy cores


def _setup(make_config, small_cache, tmp_path, *overrides):
    cfg = make_config("train.device=cpu", f"train.max_train_batches={STEPS}", *overrides)
    seed_everything(cfg.train.seed)
    train_ds, val_ds = make_datasets(cfg, small_cache, 0)
    counts = torch.bincount(torch.as_tensor(train_ds.labels), minlength=2).tolist()
    loss_fn, model = build_components(cfg, counts)
    train_loader, val_loader = make_loaders(cfg, train_ds, val_ds)
    train_cfg = cfg.train.model_copy(update={"checkpoint_dir": str(tmp_path / "run")})
    return cfg, train_cfg, model, loss_fn, train_loader, val_loader


def _fit(make_config, small_cache, tmp_path, *overrides, callbacks=None):
    cfg, train_cfg, model, loss_fn, tl, vl = _setup(make_config, small_cache, tmp_path, *overrides)
    state = fit(model, loss_fn, tl, vl, train_cfg, cfg.optim, small_cache.class_names, callbacks=callbacks)
    return cfg, train_cfg, model, loss_fn, tl, vl, state


class Recorder(Callback):
    """Calls ``fn(state, kind, *args)`` on batch and epoch ends."""

    def __init__(self, fn):
        self.fn = fn

    def on_train_batch_end(self, state, batch_index, loss):
        self.fn(state, "batch", batch_index)

    def on_epoch_end(self, state, metrics):
        self.fn(state, "epoch", metrics)


def _clone(sd):
    return {k: v.detach().clone() for k, v in sd.items()}


# ----------------------------------------------------------------------------- LR schedule
def test_cosine_with_warmup_values_and_no_restart():
    f = cosine_with_warmup(total_steps=20, warmup_steps=4, min_ratio=0.1)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0)
    assert f(12) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half way: 0.55
    assert f(20) == pytest.approx(0.1) and f(40) == pytest.approx(0.1)  # stays at the floor: no restart
    after = [f(s) for s in range(4, 41)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_fit_follows_the_schedule_in_both_param_groups(make_config, small_cache, tmp_path):
    *_, train_cfg, model, loss_fn, tl, vl, state = _fit(
        make_config, small_cache, tmp_path, "train.epochs=2", "optim.warmup_epochs=1", "optim.min_lr_ratio=0.1",
        "optim.backbone_lr=0.0005")
    steps = STEPS
    f = cosine_with_warmup(2 * steps, steps, 0.1)
    # train/lr is the head lr used by each epoch's last step: end of warm-up (1.0), then the cosine
    assert state.history["train/lr"] == pytest.approx([0.003 * f(e * steps + steps - 1) for e in range(2)])
    assert state.history["train/lr"][0] == pytest.approx(0.003)
    groups = {g["name"]: g for g in load_checkpoint(tmp_path / "run" / "last.pt")["optimizer"]["param_groups"]}
    assert groups["backbone"]["lr"] == pytest.approx(0.0005 * 0.1) and groups["head"]["lr"] == pytest.approx(0.003 * 0.1)


# ----------------------------------------------------------------------------- freeze / unfreeze
def test_backbone_frozen_for_first_epochs_then_trained(make_config, small_cache, tmp_path):
    cfg, train_cfg, model, loss_fn, tl, vl = _setup(make_config, small_cache, tmp_path, "train.epochs=2",
                                                    "train.freeze_backbone_epochs=1", "optim.backbone_lr=0.001")
    backbone0 = _clone(model.backbone.state_dict())  # parameters and BN statistics
    head0 = {k: v.clone() for k, v in model.named_parameters() if not k.startswith("backbone.")}
    seen = []

    def record(state, kind, arg):
        if kind == "batch":
            seen.append((state.epoch, model.training, model.backbone.training,
                         all(not p.requires_grad for p in model.backbone.parameters())))
        else:
            seen.append((state.epoch, "end", _clone(model.backbone.state_dict()),
                         {k: v.clone() for k, v in model.named_parameters() if not k.startswith("backbone.")}))

    fit(model, loss_fn, tl, vl, train_cfg, cfg.optim, small_cache.class_names, callbacks=[Recorder(record)])
    batches = [s for s in seen if s[1] != "end"]
    ends = [s for s in seen if s[1] == "end"]
    assert {s[1:] for s in batches if s[0] == 0} == {(True, False, True)}  # head trains, backbone eval + no grad
    assert {s[1:] for s in batches if s[0] == 1} == {(True, True, False)}
    for k, v in backbone0.items():
        torch.testing.assert_close(ends[0][2][k], v, rtol=0, atol=0)  # untouched, BN stats included
    assert any(not torch.equal(ends[0][3][k], v) for k, v in head0.items())
    assert any(not torch.equal(ends[1][2][k], v) for k, v in backbone0.items() if v.is_floating_point())
    assert all(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------- EMA
def test_ema_decay_zero_follows_the_model_and_is_validated(make_config, small_cache, tmp_path):
    *_, train_cfg, model, loss_fn, tl, vl, state = _fit(make_config, small_cache, tmp_path, "train.ema_decay=0.0")
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["eval_source"] == "ema"
    ema = evaluation_weights(last)
    assert ema.keys() == last["model"].keys()
    for k, v in last["model"].items():
        torch.testing.assert_close(ema[k], v, rtol=0, atol=0)


def test_ema_decay_one_keeps_first_step_weights_and_validation_uses_them(make_config, small_cache, tmp_path):
    first = {}

    def record(state, kind, arg):
        if kind == "batch" and state.global_step == 1:
            first.update(_clone(model_ref[0].state_dict()))

    model_ref = []
    cfg, train_cfg, model, loss_fn, tl, vl = _setup(make_config, small_cache, tmp_path, "train.ema_decay=1.0")
    model_ref.append(model)
    state = fit(model, loss_fn, tl, vl, train_cfg, cfg.optim, small_cache.class_names, callbacks=[Recorder(record)])
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    ema = evaluation_weights(last)
    for k, v in first.items():
        torch.testing.assert_close(ema[k], v, rtol=0, atol=0)
    assert any(not torch.equal(last["model"][k], v) for k, v in first.items() if v.is_floating_point())
    # the logged val/loss of the last epoch is the EMA model's, not the trained model's
    model.load_state_dict(ema)
    assert state.history["val/loss"][-1] == pytest.approx(predict(model, vl, torch.device("cpu"), loss_fn)["loss"], abs=1e-6)
    model.load_state_dict(last["model"])
    assert state.history["val/loss"][-1] != pytest.approx(predict(model, vl, torch.device("cpu"), loss_fn)["loss"], abs=1e-6)


# ----------------------------------------------------------------------------- SWA
def test_swa_averages_the_last_epochs_at_swa_lr_with_bn_update(make_config, small_cache, tmp_path):
    ends = []
    model_ref = []

    def record(state, kind, arg):
        if kind == "epoch":
            ends.append(_clone(model_ref[0].state_dict()))

    cfg, train_cfg, model, loss_fn, tl, vl = _setup(make_config, small_cache, tmp_path, "train.epochs=3",
                                                    "train.swa_epochs=2", "train.swa_lr=0.002")
    model_ref.append(model)
    state = fit(model, loss_fn, tl, vl, train_cfg, cfg.optim, small_cache.class_names, callbacks=[Recorder(record)])
    assert state.history["train/lr"][1:] == pytest.approx([0.002, 0.002])
    steps = STEPS  # the cosine covers the single epoch before SWA
    assert state.history["train/lr"][0] == pytest.approx(0.003 * cosine_with_warmup(steps, 0, 0.01)(steps - 1))
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["eval_source"] == "swa"
    swa = evaluation_weights(last)
    for name, _ in model.named_parameters():
        torch.testing.assert_close(swa[name], (ends[1][name] + ends[2][name]) / 2, rtol=0, atol=1e-6)
    bn_means = [k for k in swa if k.endswith("running_mean")]
    assert bn_means and all(not torch.equal(swa[k], ends[2][k]) for k in bn_means)  # re-estimated, not copied
    model.load_state_dict(swa)
    assert state.history["val/loss"][-1] == pytest.approx(predict(model, vl, torch.device("cpu"), loss_fn)["loss"], abs=1e-6)


class _BagNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.bn1 = nn.BatchNorm1d(3)

    def forward(self, x, mask=None):
        b, n = x.shape[:2]
        h = self.bn(self.conv(x.reshape(b * n, *x.shape[2:]))).mean((2, 3))
        return self.bn1(h).reshape(b, n, 3).mean(1)


class _TensorOnly(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_update_bn_matches_torch_update_bn():
    torch.manual_seed(0)
    images = [torch.randn(3, 4, 2, 6, 6) * 2 + 1 for _ in range(4)]
    batches = [{"image": x, "mask": torch.ones(3, 4, dtype=torch.bool), "label": torch.zeros(3)} for x in images]
    ours, ref = _BagNet(), _BagNet()
    ref.load_state_dict(ours.state_dict())
    ours.eval()
    update_bn(batches, ours, torch.device("cpu"))
    torch.optim.swa_utils.update_bn(images, _TensorOnly(ref))
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    assert not ours.training  # mode restored
    assert ours.bn.momentum == 0.1
    assert not torch.allclose(ours.bn.running_mean, torch.zeros(3))


# ----------------------------------------------------------------------------- mixup
def test_mixup_batch_mixes_whole_bags_and_masks():
    image = torch.randn(4, 3, 2, 5, 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    label = torch.tensor([0, 1, 1, 0])
    torch.manual_seed(7)
    conc = torch.tensor([0.4])
    lam = float(torch.distributions.Beta(conc, conc).sample())
    perm = torch.randperm(4)
    torch.manual_seed(7)
    out, label_b, got_lam = ClassificationStep().mixup({"image": image, "mask": mask, "label": label}, 0.4)
    assert got_lam == lam and 0 < lam < 1
    torch.testing.assert_close(out["image"], lam * image + (1 - lam) * image[perm])
    assert torch.equal(out["mask"], mask | mask[perm]) and torch.equal(label_b, label[perm])
    assert torch.equal(out["label"], label)
    with pytest.raises(ValueError, match="alpha"):
        ClassificationStep().mixup({"image": image, "mask": mask, "label": label}, 0.0)


def test_mixed_loss_equals_ce_with_mixed_soft_targets():
    torch.manual_seed(1)
    logits = torch.randn(6, 3)
    y_a, y_b = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 2, 1, 0, 0, 1])
    lam = 0.3
    got = compute_mixed_loss(nn.CrossEntropyLoss(), StepOutput(logits), y_a, y_b, lam)
    soft = lam * F.one_hot(y_a, 3).float() + (1 - lam) * F.one_hot(y_b, 3).float()
    torch.testing.assert_close(got, F.cross_entropy(logits, soft))
    torch.testing.assert_close(compute_mixed_loss(nn.CrossEntropyLoss(), StepOutput(logits), y_a, None, 1.0),
                               F.cross_entropy(logits, y_a))


def test_mixup_is_off_by_default_and_changes_training_when_on(make_config, small_cache, tmp_path):
    from losslab.config import TrainConfig

    assert TrainConfig().mixup_alpha == 0.0
    plain = _fit(make_config, small_cache, tmp_path / "a", "train.epochs=1")[-1]
    mixed = _fit(make_config, small_cache, tmp_path / "b", "train.epochs=1", "train.mixup_alpha=0.4")[-1]
    assert math.isfinite(mixed.history["train/loss"][0])
    assert mixed.history["train/loss"][0] != pytest.approx(plain.history["train/loss"][0], abs=1e-6)


# ----------------------------------------------------------------------------- early stopping
def test_early_stopping_on_min_class_recall(make_config, small_cache, tmp_path):
    # frozen backbone (eval-mode BN) and a negligible lr: the metric cannot improve after epoch 0
    *_, state = _fit(make_config, small_cache, tmp_path, "train.epochs=6", "train.freeze_backbone_epochs=6",
                     "optim.lr=1e-12", "train.monitor=val/min_class_recall", "train.early_stopping_patience=1")
    assert state.stopped_early and state.best_epoch == 0
    values = state.history["val/min_class_recall"]
    assert len(values) == 2 and values == pytest.approx([values[0]] * 2)
    assert state.best_metric == values[0]


def test_unknown_monitor_names_the_available_metrics(make_config, small_cache, tmp_path):
    with pytest.raises(KeyError, match=r"val/no_such_metric.*val/min_class_recall"):
        _fit(make_config, small_cache, tmp_path, "train.epochs=1", "train.monitor=val/no_such_metric")


# ----------------------------------------------------------------------------- failures and checkpoints
class _NanAtCall(nn.Module):
    """``loss_fn`` whose ``nan_at``-th call (0-based, training calls only: with gradients) returns NaN."""

    def __init__(self, loss_fn, nan_at):
        super().__init__()
        self.loss_fn, self.nan_at, self.calls = loss_fn, nan_at, 0

    def forward(self, logits, target):
        loss = self.loss_fn(logits, target)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls - 1 == self.nan_at:
                return loss * float("nan")
        return loss


def _finite(ckpt):
    return all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_nan_loss_names_epoch_and_first_bad_batch_and_keeps_the_last_good_checkpoint(make_config, small_cache,
                                                                                     tmp_path):
    cfg, train_cfg, model, loss_fn, tl, vl = _setup(make_config, small_cache, tmp_path, "train.epochs=3",
                                                     "train.max_train_batches=4", "train.finite_check_every=3")
    # epoch 1, batch 1: read at the check after batch 2 (every 3 steps), the batch named is the first bad one
    with pytest.raises(NonFiniteLossError, match=r"^non-finite training loss \(nan\) at epoch 1, batch 1$"):
        fit(model, _NanAtCall(loss_fn, nan_at=4 + 1), tl, vl, train_cfg, cfg.optim, small_cache.class_names)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["epoch"] == 0 and _finite(last)


def test_non_finite_weights_are_never_checkpointed(make_config, small_cache, tmp_path):
    class _InfRunningVar(Callback):  # what a diverging run (optim.backbone_lr=1e6) does to BatchNorm
        def on_train_epoch_end(self, state):
            if state.epoch == 1:
                bns = [m for m in state.run.model.modules() if isinstance(m, nn.BatchNorm2d)]
                bns[0].running_var.fill_(float("inf"))
                bns[1].running_var[0] = float("nan")

    with pytest.raises(NonFiniteWeightsError) as info:
        _fit(make_config, small_cache, tmp_path, "train.epochs=3", callbacks=[_InfRunningVar()])
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"epoch 1: checkpoint {tmp_path / 'run' / 'last.pt'} not written")
    names = [n for n, m in _setup(make_config, small_cache, tmp_path)[2].named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert f"model.{names[0]}.running_var, model.{names[1]}.running_var" in message
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["epoch"] == 0 and _finite(last)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.pt", "last.pt"]


def _tmpfs(path, size):
    """A ``size`` tmpfs at ``path`` (root only); False where it cannot be mounted."""
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


class _FullAfter:
    """A file object that raises ENOSPC once ``room`` bytes are written (a simulated full disk)."""

    def __init__(self, fh, room):
        self.fh, self.room = fh, room

    def write(self, data):
        if len(data) > self.room:
            self.fh.write(bytes(data)[:self.room])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


@pytest.mark.parametrize("real", [True, False], ids=["tmpfs", "simulated"])
def test_full_disk_ends_the_fit_with_one_line_after_the_epochs_metrics_and_no_temp_file(
        make_config, small_cache, tmp_path, monkeypatch, real):
    folder = tmp_path / "small"
    if real:
        if not _tmpfs(folder, "96k"):
            pytest.skip("a tmpfs needs root and mount here")
    else:
        folder.mkdir()
        monkeypatch.setattr(checkpoint, "open", lambda path, mode: _FullAfter(open(path, mode), 50_000), raising=False)
    epochs = []
    cfg, train_cfg, model, loss_fn, tl, vl = _setup(make_config, small_cache, tmp_path, "train.epochs=3")
    train_cfg = train_cfg.model_copy(update={"checkpoint_dir": str(folder)})
    record = Recorder(lambda state, kind, *args: epochs.append(state.epoch) if kind == "epoch" else None)
    try:
        with pytest.raises(CheckpointDiskFullError) as info:
            fit(model, loss_fn, tl, vl, train_cfg, cfg.optim, small_cache.class_names, callbacks=[record])
        assert str(info.value).startswith(f"disk full: cannot write checkpoint {folder / 'last.pt'} (No space left")
        assert "\n" not in str(info.value)
        assert epochs == [0]  # epoch 0's metrics reached the callbacks; epoch 1 did not start training
        assert list(folder.iterdir()) == []  # no temporary file left
    finally:
        if real:
            subprocess.run(["umount", str(folder)], check=True)


# ----------------------------------------------------------------------------- speed options
@pytest.mark.parametrize("option", ["train.channels_last=true", "train.compile=true"])
def test_speed_options_train_to_the_same_loss(make_config, small_cache, tmp_path, option):
    plain = _fit(make_config, small_cache, tmp_path / "plain", "train.epochs=1")[-1]
    fast = _fit(make_config, small_cache, tmp_path / "fast", "train.epochs=1", option)[-1]
    for key in ("train/loss", "val/loss"):
        # channels-last convolutions sum in another order: 2.3e-4 relative after two steps here
        assert fast.history[key] == pytest.approx(plain.history[key], rel=1e-3), key


def test_channels_last_is_refused_for_a_3d_model(make_config):
    with pytest.raises(ConfigError, match=r"^train.channels_last = True in .*: applies to 2D backbones only; "
                                          r"model.kind=volume3d"):
        make_config("model.kind=volume3d", "model.backbone=monai_resnet10", "model.head_kwargs={}",
                    "train.channels_last=true")


def test_a_seeded_fit_is_bit_reproducible_on_cpu(make_config, small_cache, tmp_path):
    first = _fit(make_config, small_cache, tmp_path / "a", "train.epochs=2")[2]
    second = _fit(make_config, small_cache, tmp_path / "b", "train.epochs=2")[2]
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
