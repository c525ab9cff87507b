"""One distill run's training and what it logs: the engine fit with the best epoch's weights scored
again, the latency, the run's tags, its summary metrics and its registered model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from losslab.config import ExperimentConfig
from losslab.engine.loop import resolve_device
from losslab.tasks import MultitaskTask
from losslab.tracking import log_and_register_model


@dataclass
class Fitted:
    best_metrics: dict[str, float]
    best_epoch: int


def fit_run(cfg: ExperimentConfig, model: nn.Module, objective: nn.Module, step: MultitaskTask, loaders: tuple,
            epochs: int, lr: float, monitor: str, run_id: str, resume: bool = False,
            extra_callbacks: list | None = None) -> Fitted:
    """Train through the engine's :func:`losslab.engine.loop.fit` (AMP, clipping, EMA, SWA, the frozen
    phase, checkpoints in ``<train.checkpoint_dir>/<run id>`` uploaded to the run, early stopping,
    alarms, per-epoch metrics logged to ``run_id``), the best epoch by ``monitor`` (its mode by name:
    ``val/loss`` lower, else higher); then load the best epoch's validated weights (EMA/SWA when on)
    back into ``model`` and score them on the validation split. ``resume``: continue the run from its
    ``last.pt`` (a run that was stopped or killed)."""
    from losslab.engine.callbacks import ReseedEachEpoch
    from losslab.engine.loop import fit
    from losslab.pipelines.scoring import load_evaluation_weights
    from losslab.engine.monitor import default_mode
    from losslab.pipelines.train import resume_checkpoint
    from losslab.tracking import MLflowCallback

    train_loader, val_loader = loaders
    train_cfg = cfg.train.model_copy(update={
        "epochs": epochs, "monitor": monitor, "monitor_mode": default_mode(monitor),
        "checkpoint_dir": str(Path(cfg.train.checkpoint_dir) / run_id)})
    tracker = MLflowCallback(run_id, [], plot_every=cfg.train.plot_every, synchronous=False,
                             checkpoint_every=cfg.train.upload_checkpoint_every, per_class_plots=False)
    # the run's last.pt, local or downloaded from its artifacts (as `train --resume`)
    resume_from = resume_checkpoint(cfg, run_id) if resume else None
    reseed = ReseedEachEpoch(train_loader, cfg.train.seed)  # the loader shuffles with its own generator
    state = fit(model, objective, train_loader, val_loader, train_cfg, cfg.optim.model_copy(update={"lr": lr}), [],
                callbacks=[reseed, tracker, *(extra_callbacks or [])], resume_from=resume_from, step=step)
    load_evaluation_weights(model, Path(train_cfg.checkpoint_dir) / "best.pt")
    tracker.remove_uploaded_checkpoints()  # the run's checkpoints/ artifacts are the copies that stay
    scored = step.metrics(step.predict(model, val_loader, resolve_device(cfg.train.device)), [])
    return Fitted(scored, state.best_epoch)


def run_latency(model: nn.Module, step: MultitaskTask, val_loader, cfg: ExperimentConfig) -> dict[str, float]:
    """``latency/*`` of :func:`losslab.engine.latency.measure_latency` (the one ``evaluate`` reports),
    with the evaluate section's warm-up and repeats, at the distill batch size."""
    from losslab.engine.latency import measure_latency

    latency = cfg.evaluate.latency
    return measure_latency(model, val_loader.dataset, resolve_device(cfg.train.device), val_loader.batch_size,
                           latency.warmup, latency.repeats, step=step)




def run_tags(cfg: ExperimentConfig, role: str, loss: str) -> dict[str, str]:
    return {"losslab.entry_point": "distill", "losslab.role": role, "losslab.loss": loss,
            "losslab.dataset": cfg.data.source, "losslab.fold": str(cfg.data.fold)}


def run_summary(fitted_metrics: dict[str, float], best_epoch: int, latency: dict[str, float]) -> dict[str, float]:
    out = {k.replace("val/", "best_val/", 1): v for k, v in fitted_metrics.items()}
    out["best_epoch"] = float(best_epoch)
    return out | latency


def log_distilled_model(model: nn.Module, registered_model_name: str | None, alias: str | None,
                        version_tags: dict[str, str], in_chans: int) -> str | None:
    """Log ``model`` in the ``losslab`` flavor (safetensors weights + spec; loaded back by
    :func:`losslab.pipelines.registry.load_registered_model`) and register it; return
    ``models:/name/version`` or None."""
    from losslab.models.export import multimodal_spec

    mv = log_and_register_model(model, None, registered_model_name, alias, version_tags,
                                spec=multimodal_spec(model, in_chans))
    return f"models:/{registered_model_name}/{mv.version}" if mv is not None else None
