"""fit(): the training loop. Knows nothing of MLflow; reports through callbacks.

What a batch is and how it becomes a loss belongs to the task: a step object
(:class:`losslab.engine.steps.Step`, built by the task of :mod:`losslab.tasks`)
turns a batch dict into model inputs, runs the forward pass, computes the loss (e.g. over both
streams of a dual-stream MIL model) and per-batch diagnostics. The loop owns time: epochs, steps,
precision, clipping, validation, checkpoints.

Features: bf16 autocast on CUDA (off on CPU), gradient clipping, cosine decay with linear warm-up
(per step, no restarts), separate backbone/head learning rates, a frozen-backbone phase
(``train.freeze_backbone_epochs``: no gradients and eval-mode BN in ``model.backbone``), EMA weights
(``train.ema_decay``), SWA over the last ``train.swa_epochs`` epochs at a constant ``train.swa_lr``
with BN re-estimation, optional mixup of whole bags (``train.mixup_alpha``), early stopping on any
logged metric, deterministic seeding, ``torch.compile`` (``train.compile``) and the channels-last
memory format (``train.channels_last``), and resume from a checkpoint.

The step never waits for the device: the loss, its terms and the sample counts are summed on the
device and read once an epoch; a NaN/inf loss is flagged on the device (the first bad batch) and the
flag read every ``train.finite_check_every`` steps and at the epoch end, ending the fit with
:class:`NonFiniteLossError` (epoch and batch in the message) before that epoch is checkpointed.
Per-batch callbacks get the loss as a 0-d device tensor.

Checkpoints (:mod:`losslab.engine.checkpoint`) hold model, EMA/SWA, optimiser, schedulers, epoch,
history and RNG states. One is written only when every tensor in it is finite (else
:class:`NonFiniteWeightsError` names the epoch and tensors; the last good checkpoint stays), copied to
CPU memory, then written atomically (temp file + fsync + ``os.replace``) by a background thread while
training goes on; fit joins that thread before it returns or raises. A full disk ends the fit with
:class:`CheckpointDiskFullError` naming the path, leaving no temporary file.

Which weights are validated: the SWA average during the SWA epochs, else the EMA when enabled,
else the trained weights. The checkpoint records that choice in ``eval_source``;
:func:`evaluation_weights` returns those weights from a checkpoint.

Under torchrun (:mod:`losslab.engine.distributed`) the model is wrapped in DistributedDataParallel for
the training steps only; every rank trains its shard, rank 0 alone validates on the whole validation
set, writes checkpoints (plain-module state dicts) and calls the callbacks, then broadcasts its
early-stop decision. ``train.freeze_backbone_epochs`` is refused under DDP.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from losslab.engine import distributed as ddp
from losslab.engine.callbacks import Callback, CallbackList, ModelCheckpoint, training_callbacks
from losslab.engine.checkpoint import CheckpointWriter, load_checkpoint, rng_state, set_rng_state
from losslab.engine.steps import ClassificationStep, Step, StepOutput, autocast

__all__ = ["FitRun", "FitState", "HOST_READ", "NonFiniteLossError", "build_optimizer", "compute_mixed_loss",
           "cosine_with_warmup", "fit", "mixed_loss_and_terms", "resolve_device", "seed_everything"]

log = logging.getLogger(__name__)
HOST_READ = "losslab::host_read"  # the profiler range around each read of device values by the loop


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; the message names the epoch and batch."""


@dataclass
class FitState:
    epoch: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    best_values: dict[str, float] | None = None  # the monitored and tie-break metrics of the best epoch
    best_tiebreak: str | None = None  # set when a tie-break metric chose the current best epoch
    history: dict[str, list[float]] = field(default_factory=dict)
    stopped_early: bool = False
    checkpoint_dir: Path | None = None
    last_val_outputs: dict[str, Any] | None = None
    eval_source: str = "model"  # the weights validated this epoch: model, ema or swa
    improved: bool = False  # this epoch became the best one
    run: Any = None  # the FitRun (model, optimiser, callbacks) for callbacks; never checkpointed


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def compute_mixed_loss(loss_fn: nn.Module, out: StepOutput, target: torch.Tensor, target_b: torch.Tensor | None,
                       lam: float, step: Step | None = None) -> torch.Tensor:
    """Mixup loss ``lam * L(y_a) + (1 - lam) * L(y_b)``; plain ``L(y_a)`` when ``target_b`` is None."""
    return mixed_loss_and_terms(loss_fn, out, target, target_b, lam, step)[0]


def mixed_loss_and_terms(loss_fn: nn.Module, out: StepOutput, target: torch.Tensor, target_b: torch.Tensor | None,
                         lam: float, step: Step | None = None
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`compute_mixed_loss` and the loss's terms mixed the same way: ``lam * terms(y_a) +
    (1 - lam) * terms(y_b)`` (each forward overwrites the loss's last terms, so they are read after each)."""
    step = step or ClassificationStep()
    loss = step.loss(loss_fn, out, target)
    terms = _loss_terms(loss_fn)
    if target_b is None:
        return loss, terms
    loss_b = step.loss(loss_fn, out, target_b)
    terms_b = _loss_terms(loss_fn)
    mixed = {k: lam * v + (1.0 - lam) * terms_b[k].to(v.device, v.dtype) for k, v in terms.items() if k in terms_b}
    return lam * loss + (1.0 - lam) * loss_b, mixed


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: nn.Module, loss_fn: nn.Module, optim_cfg: Any, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW/Adam/SGD with a backbone parameter group (``optim.backbone_lr``) and the loss's own
    learnable parameters (e.g. compound weights) in the head group; ``fused``: PyTorch's fused
    implementation (one kernel per group, step counters on the device; for CUDA)."""
    backbone = getattr(model, "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    backbone_params = [p for p in model.parameters() if id(p) in backbone_ids and p.requires_grad]
    head_params = [p for p in model.parameters() if id(p) not in backbone_ids and p.requires_grad]
    head_params += [p for p in loss_fn.parameters() if p.requires_grad]
    groups = []
    if backbone_params:
        groups.append({"params": backbone_params, "lr": optim_cfg.backbone_lr or optim_cfg.lr, "name": "backbone"})
    groups.append({"params": head_params, "lr": optim_cfg.lr, "name": "head"})
    implementation = {"fused": True} if fused else {}
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay, **implementation)
    if optim_cfg.name == "adam":
        return torch.optim.Adam(groups, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay, **implementation)
    return torch.optim.SGD(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay,
                           **implementation)


def _class_weight_metrics(loss_fn: nn.Module, class_names: list[str]) -> dict[str, float]:
    """The class weights in effect this epoch (e.g. LDAM-DRW switching on) as
    ``loss_class_weight/<class>``; 1.0 = unweighted. Empty when the loss has no class weights."""
    cw = getattr(loss_fn, "class_weights", "absent")
    if not (cw is None or isinstance(cw, torch.Tensor)):
        return {}
    return {f"loss_class_weight/{name}": float(cw[c]) if cw is not None and c < len(cw) else 1.0
            for c, name in enumerate(class_names)}


# ------------------------------------------------------------------------------ fit
@dataclass
class FitRun:
    """What one fit() call builds once and shares with its callbacks (``state.run``): the model, loss,
    configs, the task's step, device, optimiser, main LR schedule, every callback and the checkpoint
    writer."""

    model: nn.Module
    loss_fn: nn.Module
    train_cfg: Any
    optim_cfg: Any
    step: Step
    train_loader: Any
    device: torch.device
    distributed: bool
    is_main: bool
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps_per_epoch: int
    training: list[Callback]  # the behaviours train.* asks for (EMA, SWA, checkpoints, ...)
    cbs: CallbackList  # training callbacks first, then the caller's
    step_scheduler: bool = True  # False while SWA holds the learning rate
    train_model: nn.Module | None = None
    writer: CheckpointWriter = field(default_factory=CheckpointWriter)

    def payload(self, state: "FitState") -> dict[str, Any]:
        """A checkpoint: the loop's state, every callback's :meth:`Callback.state_dict`, RNG states.
        Its tensors are the live ones (on the device): copy them before training goes on."""
        loss_state = self.loss_fn.state_dict()
        out = {"model": self.model.state_dict(), "ema": None, "swa": None, "swa_scheduler": None,
               "patience_left": None, "eval_source": state.eval_source,
               "loss": loss_state if len(loss_state) else None,
               "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
               "epoch": state.epoch, "global_step": state.global_step, "best_metric": state.best_metric,
               "best_epoch": state.best_epoch, "best_values": state.best_values,
               "best_tiebreak": state.best_tiebreak, "history": state.history}
        for callback in self.training:
            out.update(callback.state_dict())
        out["rng"] = rng_state()
        return out


def fit(
    model: nn.Module,
    loss_fn: nn.Module,
    train_loader,
    val_loader,
    train_cfg: Any,
    optim_cfg: Any,
    class_names: list[str],
    callbacks: list[Callback] | None = None,
    resume_from: str | Path | None = None,
    step: Step | None = None,
) -> FitState:
    """Train ``model`` with ``loss_fn``; validate every epoch; checkpoint ``best`` and ``last``.

    The loop owns time (epochs, steps, precision, clipping, validation); what ``train.*`` switches on
    (frozen phase, EMA, SWA, alarms, early stopping, checkpoints) are the callbacks of
    :func:`losslab.engine.callbacks.training_callbacks`, run before ``callbacks``. Checkpoints are
    written by a background thread, which fit joins before it returns or raises.

    Args:
        model: returns ``(logits (B, K), attention, [aux])`` from the inputs ``step`` gives it; an
            optional ``backbone`` attribute gets ``optim.backbone_lr`` and the frozen phase.
        loss_fn: a :class:`losslab.losses.LossBase` (``on_epoch_start``, ``probabilities``,
            ``term_tensors``/``terms``, ``weights``) or any ``nn.Module`` loss.
        train_cfg / optim_cfg: :class:`losslab.config.TrainConfig` / ``OptimConfig``.
        step: the task's batch → forward → loss (:mod:`losslab.tasks`); default a plain classifier.
        resume_from: a ``last.pt`` checkpoint to continue from (same config and data); the run then
            ends with the same weights and metrics as an uninterrupted one.

    Raises:
        NonFiniteLossError: the loss became NaN/inf (epoch and first bad batch in the message).
        NonFiniteWeightsError: a checkpoint would hold NaN/inf tensors (epoch and names in the message).
        CheckpointDiskFullError: a checkpoint's file system is full (path in the message).
        KeyError: ``train.monitor`` is not a logged metric.
    """
    run = _prepare(model, loss_fn, train_loader, train_cfg, optim_cfg, step or ClassificationStep(), callbacks)
    state = FitState(checkpoint_dir=Path(train_cfg.checkpoint_dir), run=run)
    start_epoch = _restore(run, state, resume_from) if resume_from is not None else 0
    # DDP (torchrun): train_model averages gradients over ranks; `model` stays the plain module for
    # EMA/SWA, state dicts (interchangeable with single-process checkpoints) and validation
    run.train_model = ddp.wrap_model(model, run.device)
    if train_cfg.compile:
        run.train_model = torch.compile(run.train_model)
    try:
        run.cbs.on_fit_start(state)
        _run_epochs(run, state, start_epoch, val_loader, class_names)
        run.writer.close()  # the last checkpoint is on disk (and its on_checkpoint called) before on_fit_end
        run.cbs.on_fit_end(state)
    except BaseException as exc:
        _close_writer_after(exc, run)
        run.cbs.on_exception(state, exc)
        raise
    return state


def _close_writer_after(exc: BaseException, run: FitRun) -> None:
    """Join the checkpoint writer while ``exc`` ends the fit: a write still under way completes (the
    last good checkpoint), a failed one is logged (``exc`` is the error the fit reports)."""
    try:
        run.writer.close()
    except Exception as write_error:  # noqa: BLE001 - the fit already fails with exc
        if write_error is not exc:
            log.error("checkpoint write failed while the fit stopped: %s", write_error)


def _run_epochs(run: FitRun, state: FitState, start_epoch: int, val_loader, class_names: list[str]) -> None:
    """The epochs from ``start_epoch``: train, validate (rank 0), checkpoint, stop early when told."""
    samplers = [s for s in (getattr(run.train_loader, "sampler", None), getattr(run.train_loader, "batch_sampler", None))
                if hasattr(s, "set_epoch")]
    for epoch in range(start_epoch, run.train_cfg.epochs):
        state.epoch = epoch
        run.writer.raise_if_failed()  # a failed checkpoint write ends the fit before more training
        if hasattr(run.loss_fn, "on_epoch_start"):
            run.loss_fn.on_epoch_start(epoch)
        run.cbs.on_epoch_start(state)
        for sampler in samplers:  # distributed samplers: a new, rank-consistent epoch
            sampler.set_epoch(epoch)
        stats = _train_epoch(run, state, epoch)
        run.cbs.on_train_epoch_end(state)
        # Under DDP rank 0 validates on the whole validation set, checkpoints and calls the callbacks while
        # the other ranks wait in the broadcast of its early-stop decision, so that all ranks stop together.
        if run.is_main:
            _validate(run, state, val_loader, class_names, stats)
        if run.distributed:
            state.stopped_early = bool(ddp.broadcast_object(state.stopped_early))
        if state.stopped_early:
            break


def _prepare(model, loss_fn, train_loader, train_cfg, optim_cfg, step, callbacks) -> FitRun:
    """Device, memory format, optimiser, the cosine/constant schedule over the epochs before SWA, the
    callbacks."""
    distributed = ddp.is_distributed()
    device = ddp.distributed_device(train_cfg.device) if distributed else resolve_device(train_cfg.device)
    model.to(device)
    if train_cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    loss_fn.to(device)
    # fused kernels keep the optimiser's step counters on the GPU (no host reads in the step)
    optimizer = build_optimizer(model, loss_fn, optim_cfg, fused=device.type == "cuda")
    steps_per_epoch = len(train_loader) if train_cfg.max_train_batches is None else min(len(train_loader), train_cfg.max_train_batches)
    swa_epochs = min(train_cfg.swa_epochs, train_cfg.epochs)
    # the cosine decays over the epochs before SWA; SWA runs at a constant swa_lr
    total_steps = steps_per_epoch * max(1, train_cfg.epochs - swa_epochs)
    if optim_cfg.scheduler == "cosine":
        factor = cosine_with_warmup(total_steps, optim_cfg.warmup_epochs * steps_per_epoch, optim_cfg.min_lr_ratio)
    else:
        factor = lambda step: 1.0  # noqa: E731
    training = training_callbacks(train_cfg)
    run = FitRun(model=model, loss_fn=loss_fn, train_cfg=train_cfg, optim_cfg=optim_cfg, step=step,
                 train_loader=train_loader, device=device, distributed=distributed, is_main=ddp.is_main_process(),
                 optimizer=optimizer, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, factor),
                 steps_per_epoch=steps_per_epoch, training=training,
                 cbs=CallbackList(training + list(callbacks or [])))
    for callback in run.cbs.callbacks:
        callback.setup(run)
    return run


def _restore(run: FitRun, state: FitState, resume_from: str | Path) -> int:
    """Load a ``last.pt`` into the model, optimiser, schedule, state and callbacks; return the first
    epoch still to train."""
    ckpt = load_checkpoint(resume_from)
    run.model.load_state_dict(ckpt["model"])
    if ckpt.get("loss") is not None:
        run.loss_fn.load_state_dict(ckpt["loss"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    state.epoch = ckpt["epoch"]
    state.global_step = ckpt["global_step"]
    state.best_metric = ckpt["best_metric"]
    state.best_epoch = ckpt["best_epoch"]
    state.best_values = ckpt.get("best_values") or (
        {run.train_cfg.monitor: ckpt["best_metric"]} if ckpt["best_metric"] is not None else None)
    state.best_tiebreak = ckpt.get("best_tiebreak")
    state.history = {k: list(v) for k, v in ckpt["history"].items()}
    for callback in run.training:
        callback.load_state_dict(ckpt)
    set_rng_state(ckpt["rng"])
    log.info("resumed from %s at epoch %d", resume_from, ckpt["epoch"] + 1)
    return ckpt["epoch"] + 1


class _EpochSums:
    """An epoch's training loss and loss terms, summed on the device with each batch's sample count
    as weight, and the first batch whose loss is NaN/inf: nothing here is read by the host until
    :meth:`check_finite` (every ``train.finite_check_every`` steps) or :meth:`read` (epoch end).
    ``distributed``: the check gathers every rank's flag, so all ranks stop together with one message."""

    def __init__(self, device: torch.device, epoch: int, distributed: bool = False) -> None:
        self.epoch = epoch
        self.distributed = distributed
        self.dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.loss = torch.zeros((), dtype=self.dtype, device=device)
        self.terms: dict[str, torch.Tensor] = {}
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # batch index, -1 = none yet
        self.bad_value = torch.zeros((), dtype=torch.float32, device=device)
        self.seen = 0

    def add(self, batch_index: int, loss: torch.Tensor, size: int, terms: dict[str, torch.Tensor]) -> None:
        newly_bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(newly_bad, batch_index, self.first_bad)
        self.bad_value = torch.where(newly_bad, loss.float(), self.bad_value)
        self.loss += loss.to(self.dtype) * size
        for name, value in terms.items():
            total = self.terms.get(name)
            weighted = value.detach().to(self.loss.device, self.dtype) * size
            self.terms[name] = weighted if total is None else total + weighted
        self.seen += size

    def check_finite(self) -> None:
        """One host read; raises :class:`NonFiniteLossError` naming the epoch and the first bad batch.

        Under DDP every rank calls it at the same steps: the flags of all ranks are gathered first, so a
        NaN on one rank stops every rank with the same message (naming the first bad batch over the ranks
        and its rank) instead of leaving the others waiting in the next gradient all-reduce."""
        flags = torch.stack([self.first_bad.to(self.bad_value.dtype), self.bad_value])
        with torch.profiler.record_function(HOST_READ):
            rows = (ddp.all_gather_rows(flags) if self.distributed else flags[None]).tolist()
        bad = sorted((int(first_bad), rank, value) for rank, (first_bad, value) in enumerate(rows) if first_bad >= 0)
        if bad:
            batch, rank, value = bad[0]
            where = f" on rank {rank} of {len(rows)}" if self.distributed else ""
            raise NonFiniteLossError(f"non-finite training loss ({value}) at epoch {self.epoch}, batch {batch}{where}")

    def read(self) -> tuple[float, dict[str, float]]:
        """The loss sum and the term sums as floats (one host read)."""
        names = sorted(self.terms)
        with torch.profiler.record_function(HOST_READ):
            values = torch.stack([self.loss] + [self.terms[k] for k in names]).tolist()
        return values[0], dict(zip(names, values[1:]))


def _loss_terms(loss_fn: nn.Module) -> dict[str, torch.Tensor]:
    """The last forward's loss terms as detached tensors, without a host read where the loss offers
    ``term_tensors()``; else its ``terms()`` floats as tensors."""
    if hasattr(loss_fn, "term_tensors"):
        return loss_fn.term_tensors()
    if hasattr(loss_fn, "terms"):
        return {k: torch.as_tensor(v, dtype=torch.float64) for k, v in loss_fn.terms().items()}
    return {}


def _train_epoch(run: FitRun, state: FitState, epoch: int) -> dict[str, Any]:
    """One epoch of optimiser steps; returns the loss sum, samples seen, last lr, term sums and time.

    No value goes from the device to the host per step except every ``train.finite_check_every``
    steps, one read of the non-finite flag (a NaN/inf loss stops the fit within that many steps; its
    weights are never checkpointed: the epoch ends before validation)."""
    cfg, loss_fn, step = run.train_cfg, run.loss_fn, run.step
    run.train_model.train()
    loss_fn.train()
    run.cbs.on_train_epoch_start(state)  # after train(): the frozen phase puts BN back in eval mode
    show_progress = bool(getattr(cfg, "progress", False)) and sys.stderr.isatty()
    t0 = time.perf_counter()
    sums, lr = _EpochSums(run.device, epoch, run.distributed), run.optimizer.param_groups[-1]["lr"]
    for b, batch in enumerate(_progress(run.train_loader, run.steps_per_epoch, f"epoch {epoch}", show_progress)):
        if cfg.max_train_batches is not None and b >= cfg.max_train_batches:
            break
        lam, target_b = 1.0, None
        if cfg.mixup_alpha > 0:
            batch, target_b, lam = step.mixup(batch, cfg.mixup_alpha)
            target_b = target_b.to(run.device, non_blocking=True)
        target = step.target(batch, run.device)
        with autocast(run.device, cfg.amp):
            out = step.forward(run.train_model, batch, run.device)
        loss, terms = mixed_loss_and_terms(loss_fn, out, target, target_b, lam, step)
        lr = _optimizer_step(run, loss)
        state.global_step += 1
        sums.add(b, loss.detach(), step.size(target), terms)
        if (b + 1) % cfg.finite_check_every == 0:
            sums.check_finite()
        run.cbs.on_train_batch_end(state, b, loss.detach())
    sums.check_finite()
    loss_sum, term_sums = sums.read()
    train_time = time.perf_counter() - t0
    seen = sums.seen
    if run.distributed:  # train/loss over every rank's samples
        term_keys = sorted(term_sums)
        totals = ddp.all_reduce_sum([loss_sum, seen] + [term_sums[k] for k in term_keys])
        loss_sum, seen = totals[0], int(totals[1])
        term_sums = dict(zip(term_keys, totals[2:]))
    return {"loss_sum": loss_sum, "seen": seen, "lr": lr, "term_sums": term_sums, "train_time": train_time}


def _optimizer_step(run: FitRun, loss: torch.Tensor) -> float:
    """Backward, gradient averaging of the loss's own weights under DDP, clipping, step, schedule;
    returns the head learning rate the step used. Nothing here waits for the device."""
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.distributed:  # the loss's own learnable weights are outside DDP
        ddp.all_reduce_mean_grads([p for p in run.loss_fn.parameters() if p.requires_grad])
    if run.train_cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.train_cfg.grad_clip)
    lr = run.optimizer.param_groups[-1]["lr"]  # logged: the head lr of the epoch's last step
    run.optimizer.step()
    if run.step_scheduler:
        run.scheduler.step()
    return lr


def _epoch_metrics(run: FitRun, outputs: dict[str, Any], class_names: list[str], stats: dict[str, Any]) -> dict[str, float]:
    seen = max(stats["seen"], 1)
    metrics = {"train/loss": stats["loss_sum"] / seen, "train/epoch_time_s": stats["train_time"], "train/lr": stats["lr"]}
    metrics.update({f"train/loss_{k}": v / seen for k, v in stats["term_sums"].items()})
    if hasattr(run.loss_fn, "weights"):
        metrics.update({f"loss_weight/{k}": float(v) for k, v in run.loss_fn.weights().items()})
    metrics.update(_class_weight_metrics(run.loss_fn, class_names))
    metrics.update(run.step.metrics(outputs, class_names, run.loss_fn))
    return metrics


def _validate(run: FitRun, state: FitState, val_loader, class_names: list[str], stats: dict[str, Any]) -> None:
    """Validate the weights the callbacks name (SWA, EMA, else the model), record the metrics, let
    the callbacks decide (alarms, best epoch, early stopping), write the checkpoints, call back."""
    from losslab.engine.metrics import dead_class_names, pred_counts

    chosen = [c.validation_model(state) for c in run.training]
    eval_model, state.eval_source = next((c for c in chosen if c is not None), (run.model, "model"))
    outputs = run.step.predict(eval_model, val_loader, run.device, run.loss_fn, run.train_cfg.amp)
    metrics = _epoch_metrics(run, outputs, class_names, stats)
    for k, v in metrics.items():
        state.history.setdefault(k, []).append(float(v))
    state.last_val_outputs = outputs
    zero = dead_class_names(pred_counts(metrics))
    if zero:
        log.warning("epoch %d: class(es) %s predicted 0 times on validation", state.epoch, ", ".join(zero))
    run.cbs.on_validation_end(state, metrics)
    for callback in run.training:
        if isinstance(callback, ModelCheckpoint):
            callback.write(state)
    metrics["epoch"] = state.epoch
    run.cbs.on_epoch_end(state, metrics)


def _progress(loader, total: int, desc: str, enabled: bool):
    if not enabled:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, total=total, desc=desc, leave=False, dynamic_ncols=True)
