"""The engine's callback interface (after Lightning's ``Callback``): documented no-op hooks.

The engine knows nothing of MLflow; ``losslab.tracking.MLflowCallback`` turns these hooks into
MLflow calls, and the sweep turns ``on_epoch_end`` into Optuna reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Callback:
    """Base class: every hook is a no-op."""

    def on_fit_start(self, state: Any) -> None:
        """Called when fit() begins, after the model, optimiser and loaders are ready."""

    def on_fit_end(self, state: Any) -> None:
        """Called when fit() ends normally (after the last epoch or early stopping)."""

    def on_epoch_start(self, state: Any) -> None:
        """Called when a training epoch begins."""

    def on_train_batch_end(self, state: Any, batch_index: int, loss: float) -> None:
        """Called after each optimiser step with the batch's training loss."""

    def on_epoch_end(self, state: Any, metrics: dict[str, float]) -> None:
        """Called when an epoch's training and validation end, with that epoch's metrics."""

    def on_checkpoint(self, state: Any, path: Path, kind: str) -> None:
        """Called after a checkpoint (``kind`` = ``best`` or ``last``) is written atomically."""

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
