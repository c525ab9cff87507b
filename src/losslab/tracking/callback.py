"""The engine callback that logs a fit to MLflow: per-epoch metrics, checkpoints, alarms and plots.

:class:`MLflowCallback` casts per-epoch metrics to float and sends them in one ``log_batch`` per
epoch, uploads checkpoints as artifacts and sets alarms as tags. Tracking failures only warn, except
under ``LOSSLAB_TRACKING_STRICT=1`` (set by the tests) where they raise.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import mlflow
from mlflow.tracking import MlflowClient

from losslab.engine.callbacks import Callback
from losslab.tracking.runs import log_figure, log_metrics_batch

log = logging.getLogger(__name__)
STRICT_ENV = "LOSSLAB_TRACKING_STRICT"


def _strict() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def _safe(fn):
    """Tracking problems must not kill a training run: warn (raise under the strict test flag)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if _strict():
                raise
            warnings.warn(f"MLflow tracking failed in {fn.__name__}: {exc}", stacklevel=2)
            return None

    return wrapper


class MLflowCallback(Callback):
    """Engine → MLflow: per-epoch metric batches, checkpoints, alarms and plots.

    Args:
        run_id: the run to log to (the pipeline owns and ends it).
        class_names: the model's output names, for ``figures``.
        plot_every: log plots every this many epochs (and at the end); 0 = only at the end.
        log_checkpoints: upload ``best``/``last`` checkpoints under ``checkpoints/``.
        checkpoint_every: upload them every this many epochs (1 = every epoch); 0 = only when the fit
            ends or fails (the local ``last.pt`` is what ``--resume`` uses first). Uploading a large
            checkpoint every epoch is the main per-epoch cost of tracking.
        synchronous: False = MLflow's async logging for the per-epoch batches (flushed at the end).
        figures: the task's figures (:meth:`losslab.tasks.Task.epoch_figures`), ``figures(state, final,
            class_names) -> {artifact path: figure}``: per-class recall and confusion matrices of a
            classifier, a segmentation's prediction overlays. Without it, only the learning curves.

    Every epoch where a class gets no validation prediction sets the tag
    ``losslab.zero_predictions.epoch_<k>`` to those classes (at once; the ``dead_class`` alarm
    waits for ``train.dead_class_patience`` epochs). On a resumed fit, epochs that are in the
    checkpoint's history but not in the run (killed between checkpoint and logging) are logged.
    """

    def __init__(self, run_id: str, class_names: list[str], plot_every: int = 0, log_checkpoints: bool = True,
                 synchronous: bool = True, checkpoint_every: int = 1,
                 figures: Callable[[Any, bool, list[str]], dict[str, Any]] | None = None) -> None:
        self.run_id = run_id
        self.class_names = list(class_names)
        self.figures = figures
        self.plot_every = plot_every
        self.log_checkpoints = log_checkpoints
        self.checkpoint_every = checkpoint_every
        self._pending: dict[str, str] = {}  # kind -> path written but not uploaded yet
        self._uploaded: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) when it was uploaded
        self.synchronous = synchronous
        self.client = MlflowClient()
        self.alarm_tags: dict[str, str] = {}

    @_safe
    def on_fit_start(self, state):
        best = Path(state.checkpoint_dir or ".") / "best.pt"
        if self.log_checkpoints and best.is_file():  # a resumed fit whose best epoch came before the kill
            self._pending["best"] = str(best)
        history = state.history
        n = max((len(v) for v in history.values()), default=0)
        if not n:
            return
        logged = {int(m.step) for m in self.client.get_metric_history(self.run_id, "train/loss")}
        for epoch in range(n):
            if epoch not in logged:
                log_metrics_batch(self.run_id, {k: v[epoch] for k, v in history.items() if len(v) == n}, epoch)

    @_safe
    def on_epoch_end(self, state, metrics):
        step = int(metrics.get("epoch", state.epoch))
        log_metrics_batch(self.run_id, {k: v for k, v in metrics.items() if k != "epoch"}, step,
                          synchronous=self.synchronous)
        from losslab.engine.metrics import dead_class_names, pred_counts

        zero = dead_class_names(pred_counts(metrics))
        if zero:
            self.client.set_tag(self.run_id, f"losslab.zero_predictions.epoch_{step}", ",".join(zero))
        if self.plot_every and (step + 1) % self.plot_every == 0:
            self._plots(state, final=False)

    @_safe
    def on_checkpoint(self, state, path, kind):
        if not self.log_checkpoints:
            return
        self._pending[kind] = str(path)
        if kind == "last" and self.checkpoint_every and (int(state.epoch) + 1) % self.checkpoint_every == 0:
            self._upload_checkpoints()

    def _upload_checkpoints(self) -> None:
        for kind in sorted(self._pending):  # best, then last
            path = Path(self._pending[kind])
            stat = path.stat()
            self.client.log_artifact(self.run_id, str(path), artifact_path="checkpoints")
            self._uploaded[str(path)] = (stat.st_size, stat.st_mtime_ns)
        self._pending.clear()

    def remove_uploaded_checkpoints(self) -> list[str]:
        """Delete the local checkpoint files this callback uploaded and that have not changed since
        (same size and modification time), then their folder if it is empty: the run's
        ``checkpoints/`` artifacts are the copies that stay. A file whose upload failed stays (with a
        warning). Returns the paths removed."""
        removed, folders = [], set()
        for path_text, (size, mtime) in list(self._uploaded.items()):
            path = Path(path_text)
            folders.add(path.parent)
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                if (stat.st_size, stat.st_mtime_ns) == (size, mtime):
                    path.unlink()
                    removed.append(path_text)
                    del self._uploaded[path_text]
        for folder in folders:
            kept = sorted(p.name for p in folder.glob("*.pt"))
            if kept:
                log.warning("checkpoint(s) %s of run %s not uploaded: kept in %s", ", ".join(kept), self.run_id, folder)
            with contextlib.suppress(OSError):
                folder.rmdir()
        return removed

    @_safe
    def on_alarm(self, state, alarm):
        self.client.set_tag(self.run_id, f"losslab.alarm.{alarm.name}", alarm.message[:5000])

    @_safe
    def on_fit_end(self, state):
        self._flush()
        self._upload_checkpoints()
        self._plots(state, final=True)

    @_safe
    def on_exception(self, state, exc):
        self._flush()
        self._upload_checkpoints()
        self.remove_uploaded_checkpoints()  # `--resume` downloads them again

    def _flush(self) -> None:
        if not self.synchronous:
            mlflow.flush_async_logging()

    def _plots(self, state, final: bool) -> None:
        if self.figures is not None:
            figures = self.figures(state, final, self.class_names)
        else:
            from losslab import plots

            hist = state.history
            curves = [k for k in ("train/loss", "val/loss", "val/mean_balanced_accuracy", "val/mean_f1_macro") if k in hist]
            figures = {"plots/curves.png": plots.plot_curves(hist, curves),
                       "plots/loss_curves.png": plots.plot_curves(hist, [k for k in ("train/loss", "val/loss") if k in hist])}
        for path, figure in figures.items():
            log_figure(figure, path)
