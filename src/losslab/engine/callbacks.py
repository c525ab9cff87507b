"""The engine's callbacks (after Lightning's ``Callback``): documented no-op hooks, and the training
behaviours that come and go with the config, each a small class with ``state_dict`` /
``load_state_dict`` so that a resumed fit restores it.

The engine knows nothing of MLflow; ``losslab.tracking.MLflowCallback`` turns these hooks into
MLflow calls, and the sweep turns ``on_epoch_end`` into Optuna reports. The loop
(:func:`losslab.engine.loop.fit`) builds the training callbacks from ``train.*``
(:func:`training_callbacks`) and runs them before the caller's:

* :class:`FreezeBackbone` — ``train.freeze_backbone_epochs``: no gradients, eval-mode BN in
  ``model.backbone`` for the first N epochs.
* :class:`EMA` — ``train.ema_decay``: an exponential moving average of the weights, validated.
* :class:`SWA` — ``train.swa_epochs``: an equal average over the last N epochs at a constant
  ``train.swa_lr`` (SWALR), BN statistics re-estimated, validated during those epochs.
* :class:`AlarmMonitor` — dead class, overfitting, unstable balanced accuracy (``train.*`` thresholds).
* :class:`EarlyStopping` — ``train.early_stopping_patience`` epochs without a new best.
* :class:`ModelCheckpoint` — the best epoch by ``train.monitor`` then ``train.monitor_tiebreak``;
  atomic ``last.pt`` every epoch and ``best.pt`` when it improves, holding every callback's state.

Training callbacks reach the fit's objects through ``state.run`` (model, optimiser, loaders, config),
set in :meth:`Callback.setup`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from losslab.engine.checkpoint import non_finite_tensors, to_cpu


class NonFiniteWeightsError(FloatingPointError):
    """A checkpoint was not written: a weight, buffer or optimiser state is NaN/inf (the message names
    the epoch and the first tensors)."""


class Callback:
    """Base class: every hook is a no-op; ``state_dict`` is empty."""

    def setup(self, run: Any) -> None:
        """Called once when fit() has built the model, optimiser and schedulers (before a resume)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this callback (top-level checkpoint keys)."""
        return {}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Restore from a checkpoint written with :meth:`state_dict` (reads its own keys)."""

    def validation_model(self, state: Any) -> tuple[Any, str] | None:
        """The weights to validate this epoch and their name (``eval_source``), or None."""
        return None

    def on_train_epoch_start(self, state: Any) -> None:
        """Called when the model is in training mode, before the epoch's first batch."""

    def on_train_epoch_end(self, state: Any) -> None:
        """Called after the epoch's last optimiser step, before validation."""

    def on_validation_end(self, state: Any, metrics: dict[str, float]) -> None:
        """Called on the validating rank with the epoch's metrics, before checkpoints are written."""

    def on_fit_start(self, state: Any) -> None:
        """Called when fit() begins, after the model, optimiser and loaders are ready."""

    def on_fit_end(self, state: Any) -> None:
        """Called when fit() ends normally (after the last epoch or early stopping)."""

    def on_epoch_start(self, state: Any) -> None:
        """Called when a training epoch begins."""

    def on_train_batch_end(self, state: Any, batch_index: int, loss: torch.Tensor) -> None:
        """Called after each optimiser step with the batch's training loss, a detached 0-d tensor on the
        training device: reading it (``float(loss)``) makes the host wait for the device, so read it
        only when needed."""

    def on_epoch_end(self, state: Any, metrics: dict[str, float]) -> None:
        """Called when an epoch's training and validation end, with that epoch's metrics."""

    def on_checkpoint(self, state: Any, path: Path, kind: str) -> None:
        """Called once a checkpoint (``kind`` = ``best`` or ``last``) is on disk (written atomically in
        the background; ``state`` is that epoch's, the call comes at a later epoch or when fit ends)."""

    def on_alarm(self, state: Any, alarm: Any) -> None:
        """Called when a diagnostic alarm fires (dead class, overfitting, unstable metric)."""

    def on_exception(self, state: Any, exc: BaseException) -> None:
        """Called when fit() fails, before the exception propagates."""


class CallbackList(Callback):
    def __init__(self, callbacks: list[Callback] | None = None) -> None:
        self.callbacks = list(callbacks or [])

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def on_fit_start(self, state):
        self._call("on_fit_start", state)

    def on_fit_end(self, state):
        self._call("on_fit_end", state)

    def on_epoch_start(self, state):
        self._call("on_epoch_start", state)

    def on_train_epoch_start(self, state):
        self._call("on_train_epoch_start", state)

    def on_train_epoch_end(self, state):
        self._call("on_train_epoch_end", state)

    def on_validation_end(self, state, metrics):
        self._call("on_validation_end", state, metrics)

    def on_train_batch_end(self, state, batch_index, loss):
        self._call("on_train_batch_end", state, batch_index, loss)

    def on_epoch_end(self, state, metrics):
        self._call("on_epoch_end", state, metrics)

    def on_checkpoint(self, state, path, kind):
        self._call("on_checkpoint", state, path, kind)

    def on_alarm(self, state, alarm):
        self._call("on_alarm", state, alarm)

    def on_exception(self, state, exc):
        self._call("on_exception", state, exc)


# ------------------------------------------------------------------------------ training callbacks
def set_backbone_frozen(model: nn.Module, frozen: bool) -> bool:
    """Freeze (``requires_grad=False``, BN in eval mode) or unfreeze ``model.backbone``.

    Returns False when the model has no ``backbone`` attribute (nothing to do). Call it after
    ``model.train()``: freezing puts the backbone back in eval mode."""
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        return False
    for p in backbone.parameters():
        p.requires_grad_(not frozen)
    if frozen:
        backbone.eval()
    return True


class FreezeBackbone(Callback):
    """``model.backbone`` frozen (``requires_grad=False``, BN in eval mode) for the first ``epochs``."""

    def __init__(self, epochs: int) -> None:
        self.epochs = int(epochs)

    def setup(self, run):
        if run.distributed and self.epochs > 0:
            # toggling requires_grad on a DDP-wrapped model breaks its gradient reduction
            raise ValueError(f"train.freeze_backbone_epochs={self.epochs} is not supported under torchrun/DDP; "
                             "set train.freeze_backbone_epochs=0 or train in one process")

    def on_train_epoch_start(self, state):
        set_backbone_frozen(state.run.model, state.epoch < self.epochs)


class EMA(Callback):
    """An exponential moving average of the weights (parameters and buffers), updated after every
    optimiser step and validated instead of the trained weights (``eval_source = "ema"``)."""

    def __init__(self, decay: float) -> None:
        self.decay = float(decay)
        self.ema = None
        self.updates = 0  # counted on the host: the step never reads the device's n_averaged

    def setup(self, run):
        from losslab.engine.ema import build_ema

        self.ema = build_ema(run.model, self.decay)

    def on_train_batch_end(self, state, batch_index, loss):
        from losslab.engine.ema import update_ema

        update_ema(self.ema, state.run.model, self.decay, first=self.updates == 0)
        self.updates += 1

    def validation_model(self, state):
        return self.ema.module, "ema"

    def state_dict(self):
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, checkpoint):
        if checkpoint.get("ema") is not None:
            self.ema.load_state_dict(checkpoint["ema"])
            self.updates = int(self.ema.n_averaged)


class SWA(Callback):
    """Stochastic weight averaging (Izmailov et al., UAI 2018, arXiv:1803.05407) over the last
    ``epochs`` epochs: the cosine schedule stops, SWALR holds ``train.swa_lr`` (default half of
    ``optim.lr``; the backbone group keeps its ratio), the average is updated after each epoch and
    its BN statistics re-estimated on the training data; it is validated during those epochs."""

    def __init__(self, epochs: int, total_epochs: int) -> None:
        self.epochs = min(int(epochs), int(total_epochs))
        self.start = int(total_epochs) - self.epochs
        self.swa_model = None
        self.scheduler = None
        self.run = None

    def setup(self, run):
        from losslab.engine.ema import build_swa

        self.run = run
        self.swa_model = build_swa(run.model)

    def active(self, epoch: int) -> bool:
        return epoch >= self.start

    def on_epoch_start(self, state):
        if self.active(state.epoch) and self.scheduler is None:
            self.scheduler = self._swalr()
        state.run.step_scheduler = not self.active(state.epoch)

    def _swalr(self):
        from torch.optim.swa_utils import SWALR

        run = self.run
        swa_lr = run.train_cfg.swa_lr or 0.5 * run.optim_cfg.lr
        ratio = (run.optim_cfg.backbone_lr or run.optim_cfg.lr) / run.optim_cfg.lr
        lrs = [swa_lr * ratio if group.get("name") == "backbone" else swa_lr for group in run.optimizer.param_groups]
        return SWALR(run.optimizer, swa_lr=lrs, anneal_epochs=0)

    def on_train_epoch_end(self, state):
        if not self.active(state.epoch):
            return
        from losslab.engine.ema import update_bn

        run = self.run
        self.swa_model.update_parameters(run.model)
        self.scheduler.step()
        if run.is_main:  # BN statistics from rank 0's shard: only rank 0 validates
            update_bn(run.train_loader, self.swa_model.module, run.device, run.train_cfg.max_train_batches, run.step)

    def validation_model(self, state):
        return (self.swa_model.module, "swa") if self.active(state.epoch) else None

    def state_dict(self):
        active = self.scheduler is not None
        return {"swa": self.swa_model.state_dict() if active else None,
                "swa_scheduler": self.scheduler.state_dict() if active else None}

    def load_state_dict(self, checkpoint):
        if checkpoint.get("swa") is not None:
            self.swa_model.load_state_dict(checkpoint["swa"])
        if checkpoint.get("swa_scheduler") is not None:
            groups = self.run.optimizer.param_groups
            lrs = [group["lr"] for group in groups]
            self.scheduler = self._swalr()  # its first step moves the lr ...
            self.scheduler.load_state_dict(checkpoint["swa_scheduler"])
            for group, lr in zip(groups, lrs):  # ... so put back the saved one
                group["lr"] = lr


class AlarmMonitor(Callback):
    """:class:`losslab.engine.metrics.Alarms` over each epoch's metrics; every alarm is logged and
    passed to the callbacks' ``on_alarm``. On resume the earlier epochs are replayed silently."""

    def __init__(self, train_cfg: Any) -> None:
        from losslab.engine.metrics import Alarms

        self.alarms = Alarms(dead_class_patience=train_cfg.dead_class_patience,
                             loss_gap_threshold=train_cfg.loss_gap_threshold,
                             bal_acc_var_window=train_cfg.bal_acc_var_window,
                             bal_acc_var_threshold=train_cfg.bal_acc_var_threshold)

    def on_validation_end(self, state, metrics):
        import logging

        for alarm in self.alarms.update(state.epoch, metrics):
            logging.getLogger("losslab.engine.loop").warning("epoch %d: %s", state.epoch, alarm.message)
            state.run.cbs.on_alarm(state, alarm)

    def load_state_dict(self, checkpoint):
        history = checkpoint.get("history") or {}
        n = max((len(v) for v in history.values()), default=0)
        for epoch in range(n):  # they fired in the first process
            self.alarms.update(epoch, {k: v[epoch] for k, v in history.items() if len(v) == n})


class EarlyStopping(Callback):
    """Stop after ``patience`` validated epochs without a new best (the same rule as the checkpoint:
    ``train.monitor``, then the tie-breaks); None never stops."""

    def __init__(self, patience: int | None, rule: Any) -> None:
        self.patience = patience
        self.patience_left = patience
        self.rule = rule
        self.best: dict[str, float] | None = None

    def on_validation_end(self, state, metrics):
        improved, _ = self.rule.compare(metrics, self.best)
        if improved:
            self.best = self.rule.remember(metrics)
            self.patience_left = self.patience
        elif self.patience_left is not None:
            self.patience_left -= 1
            if self.patience_left <= 0:
                state.stopped_early = True
                import logging

                logging.getLogger("losslab.engine.loop").info(
                    "early stopping at epoch %d (best %s=%s at epoch %s)", state.epoch, self.rule.monitor,
                    state.best_metric, state.best_epoch)

    def state_dict(self):
        return {"patience_left": self.patience_left}

    def load_state_dict(self, checkpoint):
        self.patience_left = checkpoint.get("patience_left", self.patience_left)
        self.best = checkpoint.get("best_values") or (
            {self.rule.monitor: checkpoint["best_metric"]} if checkpoint.get("best_metric") is not None else None)


class ModelCheckpoint(Callback):
    """The best epoch (``rule``: monitor, then tie-breaks) and atomic checkpoints: ``last.pt`` every
    validated epoch, ``best.pt`` (the same bytes) when it improves; each holds the loop's state and
    every callback's :meth:`state_dict`. Raises ``KeyError`` when the monitored metric is not logged."""

    def __init__(self, rule: Any) -> None:
        self.rule = rule

    def on_validation_end(self, state, metrics):
        import logging

        monitored = metrics.get(self.rule.monitor)
        if monitored is None:
            raise KeyError(f"train.monitor {self.rule.monitor!r} is not a logged metric; available: {sorted(metrics)}")
        improved, tiebreak = self.rule.compare(metrics, state.best_values)
        if improved:
            state.best_metric, state.best_epoch = float(monitored), state.epoch
            state.best_values, state.best_tiebreak = self.rule.remember(metrics), tiebreak
            if tiebreak:
                logging.getLogger("losslab.engine.loop").info("epoch %d becomes best by tie-break: %s",
                                                              state.epoch, tiebreak)
        state.improved = improved

    def write(self, state) -> None:
        """Hand ``last.pt`` (and ``best.pt`` when the epoch improved) to the fit's background writer
        (``state.run.writer``) as a CPU copy; ``on_checkpoint`` follows once the file is on disk.

        Raises:
            NonFiniteWeightsError: a tensor of the checkpoint is NaN/inf (nothing is written).
        """
        best_path, last_path = state.checkpoint_dir / "best.pt", state.checkpoint_dir / "last.pt"
        payload = state.run.payload(state)
        bad = non_finite_tensors(payload)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise NonFiniteWeightsError(f"epoch {state.epoch}: checkpoint {last_path} not written: non-finite values "
                                        f"in {len(bad)} tensor(s): {shown}")
        written = dataclasses.replace(state)  # this epoch's state, for on_checkpoint after the write
        kinds = ([("best", best_path)] if state.improved else []) + [("last", last_path)]

        def on_written() -> None:
            for kind, path in kinds:
                state.run.cbs.on_checkpoint(written, path, kind)

        state.run.writer.submit(last_path, to_cpu(payload), copies=(best_path,) if state.improved else (),
                                on_written=on_written)


class ReseedEachEpoch(Callback):
    """A training loader whose shuffle (its own ``generator``) or random transforms (MONAI's, with
    ``set_random_state``: segmentation crops and flips) do not draw from the global RNGs a checkpoint
    saves: reseed them from ``(seed, epoch)`` at the start of every epoch, so that a resumed run draws
    the batches the uninterrupted run drew."""

    def __init__(self, loader, seed: int) -> None:
        self.loader = loader
        self.seed = int(seed)

    def on_epoch_start(self, state):
        epoch_seed = (self.seed * 1_000_003 + int(state.epoch)) % (2**32)
        transform = getattr(self.loader.dataset, "transform", None)
        if transform is not None and hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=epoch_seed)
        if getattr(self.loader, "generator", None) is not None:
            self.loader.generator.manual_seed(epoch_seed)


def training_callbacks(train_cfg: Any) -> list[Callback]:
    """The training callbacks ``train.*`` asks for, in the order they must run."""
    from losslab.engine.monitor import BestModelRule

    rule = BestModelRule.from_config(train_cfg)
    out: list[Callback] = []
    if train_cfg.freeze_backbone_epochs:
        out.append(FreezeBackbone(train_cfg.freeze_backbone_epochs))
    if train_cfg.swa_epochs:
        out.append(SWA(train_cfg.swa_epochs, train_cfg.epochs))
    if train_cfg.ema_decay is not None:
        out.append(EMA(train_cfg.ema_decay))
    # the checkpoint decides the best epoch before early stopping counts; both before the file is written
    out += [AlarmMonitor(train_cfg), ModelCheckpoint(rule), EarlyStopping(train_cfg.early_stopping_patience, rule)]
    return out
