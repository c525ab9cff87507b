"""One distill run's training and what it logs: the engine fit with the best epoch's weights scored
again (on the validation split that picked the epoch, ``best_val/*``, and on the held-out test split,
``test/*``), the latency, the run's tags, its summary metrics and its registered model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from losslab.config import ExperimentConfig
from losslab.engine.loop import resolve_device
from losslab.tasks import MultitaskStep
from losslab.tracking import log_and_register_model


@dataclass
class Fitted:
    best_metrics: dict[str, float]  # val/*: the best epoch's weights on the validation split
    best_epoch: int
    test_metrics: dict[str, float] = field(default_factory=dict)  # test/*: the same weights on the test split


def score_test(model: nn.Module, step: MultitaskStep, test_loader, device) -> dict[str, float]:
    """``test/<task>/…`` and ``test/mean_…`` of ``model`` on the held-out test split (``{}`` without one)."""
    if test_loader is None:
        return {}
    return {"test/" + k.split("/", 1)[1]: v for k, v in step.metrics(step.predict(model, test_loader, device), []).items()}


def fit_run(cfg: ExperimentConfig, model: nn.Module, objective: nn.Module, step: MultitaskStep, loaders: tuple,
            epochs: int, lr: float, monitor: str, run_id: str, resume: bool = False,
            extra_callbacks: list | None = None, test_loader=None) -> Fitted:
    """Train through the engine's :func:`losslab.engine.loop.fit` (AMP, clipping, EMA, SWA, the frozen
    phase, checkpoints in ``<train.checkpoint_dir>/<run id>`` uploaded to the run, early stopping,
    alarms, per-epoch metrics logged to ``run_id``), the best epoch by ``monitor`` (its mode by name:
    ``val/loss`` lower, else higher); then load the best epoch's validated weights (EMA/SWA when on)
    back into ``model`` and score them on the validation split and, with ``test_loader``, on the held-out
    test split (:func:`score_test`). ``resume``: continue the run from its ``last.pt`` (a run that was
    stopped or killed)."""
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
                             checkpoint_every=cfg.train.upload_checkpoint_every)
    # the run's last.pt, local or downloaded from its artifacts (as `train --resume`)
    resume_from = resume_checkpoint(cfg, run_id) if resume else None
    reseed = ReseedEachEpoch(train_loader, cfg.train.seed)  # the loader shuffles with its own generator
    state = fit(model, objective, train_loader, val_loader, train_cfg, cfg.optim.model_copy(update={"lr": lr}), [],
                callbacks=[reseed, tracker, *(extra_callbacks or [])], resume_from=resume_from, step=step)
    load_evaluation_weights(model, Path(train_cfg.checkpoint_dir) / "best.pt")
    tracker.remove_uploaded_checkpoints()  # the run's checkpoints/ artifacts are the copies that stay
    device = resolve_device(cfg.train.device)
    scored = step.metrics(step.predict(model, val_loader, device), [])
    return Fitted(scored, state.best_epoch, score_test(model, step, test_loader, device))


def run_latency(model: nn.Module, step: MultitaskStep, val_loader, cfg: ExperimentConfig) -> dict[str, float]:
    """``latency/*`` of :func:`losslab.engine.latency.measure_latency` (the one ``evaluate`` reports),
    with the evaluate section's warm-up and repeats, at the distill batch size."""
    from losslab.engine.latency import measure_latency

    latency = cfg.evaluate.latency
    return measure_latency(model, val_loader.dataset, resolve_device(cfg.train.device), val_loader.batch_size,
                           latency.warmup, latency.repeats, step=step, collate=val_loader.collate_fn)




def run_tags(cfg: ExperimentConfig, role: str, loss: str) -> dict[str, str]:
    """The tags of a teacher or student run: a train run of the multitask task (``compare`` reads it as
    any fold run), its role in the distillation and its loss (``teacher``, a loss name, ``none``)."""
    return {"losslab.entry_point": "train", "losslab.task": "multitask", "losslab.role": role, "losslab.loss": loss,
            "losslab.dataset": cfg.data.source, "losslab.fold": str(cfg.data.fold), "losslab.seed": str(cfg.train.seed)}


def run_summary(fitted: Fitted, latency: dict[str, float]) -> dict[str, float]:
    """``best_val/*`` (the validation split that picked the epoch), ``test/*`` (the held-out test split),
    ``best_epoch`` and the latency."""
    out = {k.replace("val/", "best_val/", 1): v for k, v in fitted.best_metrics.items()} | fitted.test_metrics
    out["best_epoch"] = float(fitted.best_epoch)
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
