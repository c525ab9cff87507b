"""fit(): the training loop. Knows nothing of MLflow; reports through callbacks.

What a batch is and how it becomes a loss belongs to the task: a step object
(:class:`losslab.engine.steps.ClassificationStep`, subclassed by the tasks of :mod:`losslab.tasks`)
turns a batch dict into model inputs, runs the forward pass, computes the loss (e.g. over both
streams of a dual-stream MIL model) and per-batch diagnostics. The loop owns time: epochs, steps,
precision, clipping, validation, checkpoints.

Features: bf16 autocast on CUDA (off on CPU), gradient clipping, cosine decay with linear warm-up
(per step, no restarts), separate backbone/head learning rates, a frozen-backbone phase
(``train.freeze_backbone_epochs``: no gradients and eval-mode BN in ``model.backbone``), EMA weights
(``train.ema_decay``), SWA over the last ``train.swa_epochs`` epochs at a constant ``train.swa_lr``
with BN re-estimation, optional mixup of whole bags (``train.mixup_alpha``), early stopping on any
logged metric, deterministic seeding, atomic checkpoints (temp file + ``os.replace``) holding model,
EMA/SWA, optimiser, schedulers, epoch, history and RNG states, resume from a checkpoint, and a stop
with the epoch and batch in the message when the loss becomes NaN/inf (the last good checkpoint
stays).

Which weights are validated: the SWA average during the SWA epochs, else the EMA when enabled,
else the trained weights. The checkpoint records that choice in ``eval_source``;
:func:`evaluation_weights` returns those weights from a checkpoint.

Under torchrun (:mod:`losslab.engine.distributed`) the model is wrapped in DistributedDataParallel for
the training steps only; every rank trains its shard, rank 0 alone validates on the whole validation
set, writes checkpoints (plain-module state dicts) and calls the callbacks, then broadcasts its
early-stop decision. ``train.freeze_backbone_epochs`` is refused under DDP.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from losslab.engine import distributed as ddp
from losslab.engine.callbacks import Callback, CallbackList
from losslab.engine.ema import averaged_weights, mixup_batch
from losslab.engine.steps import ClassificationStep, StepOutput

log = logging.getLogger(__name__)
SLEEP_ENV = "LOSSLAB_TEST_SLEEP_PER_BATCH"  # tests only: seconds to sleep after each training batch


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


def forward_batch(model: nn.Module, batch: dict[str, Any], device: torch.device,
                  step: ClassificationStep | None = None) -> tuple[torch.Tensor, Any, dict]:
    """Run the model on a batch through ``step`` (default: a plain classifier); return
    ``(logits (B, K), attention (B, N) | None, aux dict)``."""
    out = (step or ClassificationStep()).forward(model, batch, device)
    return out.logits, out.attention, out.aux


def compute_mixed_loss(loss_fn: nn.Module, out: StepOutput, target: torch.Tensor, target_b: torch.Tensor | None,
                       lam: float, step: ClassificationStep | None = None) -> torch.Tensor:
    """Mixup loss ``lam * L(y_a) + (1 - lam) * L(y_b)``; plain ``L(y_a)`` when ``target_b`` is None."""
    step = step or ClassificationStep()
    loss = step.loss(loss_fn, out, target)
    if target_b is None:
        return loss
    return lam * loss + (1.0 - lam) * step.loss(loss_fn, out, target_b)


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: nn.Module, loss_fn: nn.Module, optim_cfg: Any) -> torch.optim.Optimizer:
    """AdamW/Adam/SGD with a backbone parameter group (``optim.backbone_lr``) and the loss's own
    learnable parameters (e.g. compound weights) in the head group."""
    backbone = getattr(model, "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    backbone_params = [p for p in model.parameters() if id(p) in backbone_ids and p.requires_grad]
    head_params = [p for p in model.parameters() if id(p) not in backbone_ids and p.requires_grad]
    head_params += [p for p in loss_fn.parameters() if p.requires_grad]
    groups = []
    if backbone_params:
        groups.append({"params": backbone_params, "lr": optim_cfg.backbone_lr or optim_cfg.lr, "name": "backbone"})
    groups.append({"params": head_params, "lr": optim_cfg.lr, "name": "head"})
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)
    if optim_cfg.name == "adam":
        return torch.optim.Adam(groups, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)
    return torch.optim.SGD(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay)


# ------------------------------------------------------------------------------ checkpoints
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any], copies: tuple[Path, ...] = ()) -> None:
    """Write atomically: ``torch.save`` straight into a temp file in the same folder, fsync, then
    ``os.replace``.

    ``copies``: more paths that get the same bytes, as hard links to the file just written (no second
    write: for a 14 M-parameter 3D model with AdamW state, 173 MB, that was half the checkpoint's time).
    A later ``os.replace`` of ``path`` gives it a new file and leaves the copies as they are. Where the
    file system has no hard links the bytes are written again."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    for target in map(Path, copies):
        target.parent.mkdir(parents=True, exist_ok=True)
        linked = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            linked.unlink()
        try:
            os.link(tmp, linked)
        except OSError:  # no hard links here (or another device): copy the bytes
            shutil.copyfile(tmp, linked)
        os.replace(linked, target)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code on load)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def evaluation_weights(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint was validated with: SWA, EMA or the trained model (``eval_source``)."""
    source = ckpt.get("eval_source", "model")
    if source == "model":
        return ckpt["model"]
    return averaged_weights(ckpt[source])


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


# ------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, loss_fn: nn.Module | None = None,
            amp: bool = False, step: ClassificationStep | None = None) -> dict[str, Any]:
    """Run the model over a loader through ``step``; return logits, probabilities, predictions,
    labels, attention, the mean loss and the step's diagnostics (sample-weighted means, NaN skipped)."""
    model.eval()
    step = step or ClassificationStep()
    logits_all, labels_all, attn_all, masks_all, index_all = [], [], [], [], []
    loss_sum, n = 0.0, 0
    diag_sums: dict[str, list[float]] = {}
    for batch in loader:
        with autocast(device, amp):
            out = step.forward(model, batch, device)
        target = step.target(batch, device)
        out.logits = out.logits.float()
        for name, value in step.batch_diagnostics(out, batch).items():
            if value == value:
                acc = diag_sums.setdefault(name, [0.0, 0])
                acc[0] += value * len(target)
                acc[1] += len(target)
        if loss_fn is not None:
            loss_sum += float(step.loss(loss_fn, out, target)) * len(target)
        n += len(target)
        logits_all.append(out.logits.cpu())
        labels_all.append(batch["label"])
        index_all.append(batch["index"])
        if out.attention is not None:
            attn_all.append(out.attention.float().cpu())
            masks_all.append(batch["mask"])
    logits = torch.cat(logits_all)
    if loss_fn is not None and hasattr(loss_fn, "probabilities"):
        probs = loss_fn.probabilities(logits)
    else:
        probs = torch.softmax(logits, dim=1)
    result = {
        "logits": logits.numpy(),
        "probs": probs.detach().numpy(),
        # the loss's own decision rule (e.g. CORAL counts thresholds), else argmax
        "pred": (loss_fn.predict(logits) if callable(getattr(loss_fn, "predict", None))
                 else probs.argmax(dim=1)).detach().numpy(),
        "labels": torch.cat(labels_all).numpy(),
        "index": torch.cat(index_all).numpy(),
        "loss": loss_sum / max(n, 1),
        "diagnostics": {name: total / count for name, (total, count) in diag_sums.items()},
    }
    if attn_all and all(a.shape[1] == attn_all[0].shape[1] for a in attn_all):
        result["attention"] = torch.cat(attn_all).numpy()
        result["mask"] = torch.cat(masks_all).numpy()
    return result


def autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def validation_metrics(outputs: dict[str, Any], class_names: list[str], loss_fn: nn.Module | None = None) -> dict[str, float]:
    """``val/*`` metrics from predict() outputs (classification metrics, MIL attention statistics and,
    for DSMIL, the selection confidence of the critical instance)."""
    from losslab.engine.metrics import classification_metrics

    y_pred = outputs.get("pred")  # predict() already applied the loss's decision rule
    if y_pred is None and loss_fn is not None and hasattr(loss_fn, "predict"):
        y_pred = loss_fn.predict(torch.as_tensor(outputs["logits"])).numpy()
    metrics = classification_metrics(outputs["labels"], outputs["probs"], class_names, y_pred=y_pred)
    out = {f"val/{k}": float(v) for k, v in metrics.items()}
    out["val/loss"] = float(outputs["loss"])
    for name, value in outputs.get("diagnostics", {}).items():
        out[f"val/{name}"] = float(value)
    if "attention" in outputs:
        from losslab.engine.diagnostics import attention_statistics

        for k, v in attention_statistics(outputs["attention"], outputs["mask"]).items():
            out[f"val/{k}"] = float(v)
    return out


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
    configs, the task's step, device, optimiser, main LR schedule and every callback."""

    model: nn.Module
    loss_fn: nn.Module
    train_cfg: Any
    optim_cfg: Any
    step: ClassificationStep
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

    def payload(self, state: "FitState") -> dict[str, Any]:
        """A checkpoint: the loop's state, every callback's :meth:`Callback.state_dict`, RNG states."""
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
        out["rng"] = _rng_state()
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
    step: ClassificationStep | None = None,
) -> FitState:
    """Train ``model`` with ``loss_fn``; validate every epoch; checkpoint ``best`` and ``last``.

    The loop owns time (epochs, steps, precision, clipping, validation); what ``train.*`` switches on
    (frozen phase, EMA, SWA, alarms, early stopping, checkpoints) are the callbacks of
    :func:`losslab.engine.callbacks.training_callbacks`, run before ``callbacks``.

    Args:
        model: returns ``(logits (B, K), attention, [aux])`` from the inputs ``step`` gives it; an
            optional ``backbone`` attribute gets ``optim.backbone_lr`` and the frozen phase.
        loss_fn: a :class:`losslab.losses.LossBase` (``on_epoch_start``, ``probabilities``, ``terms``,
            ``weights``) or any ``nn.Module`` loss.
        train_cfg / optim_cfg: :class:`losslab.config.TrainConfig` / ``OptimConfig``.
        step: the task's batch → forward → loss (:mod:`losslab.tasks`); default a plain classifier.
        resume_from: a ``last.pt`` checkpoint to continue from (same config and data); the run then
            ends with the same weights and metrics as an uninterrupted one.

    Raises:
        NonFiniteLossError: the loss became NaN/inf (epoch and batch in the message).
        KeyError: ``train.monitor`` is not a logged metric.
    """
    run = _prepare(model, loss_fn, train_loader, train_cfg, optim_cfg, step or ClassificationStep(), callbacks)
    state = FitState(checkpoint_dir=Path(train_cfg.checkpoint_dir), run=run)
    start_epoch = _restore(run, state, resume_from) if resume_from is not None else 0
    # DDP (torchrun): train_model averages gradients over ranks; `model` stays the plain module for
    # EMA/SWA, state dicts (interchangeable with single-process checkpoints) and validation
    run.train_model = ddp.wrap_model(model, run.device)
    samplers = [s for s in (getattr(train_loader, "sampler", None), getattr(train_loader, "batch_sampler", None))
                if hasattr(s, "set_epoch")]
    try:
        run.cbs.on_fit_start(state)
        for epoch in range(start_epoch, train_cfg.epochs):
            state.epoch = epoch
            if hasattr(loss_fn, "on_epoch_start"):
                loss_fn.on_epoch_start(epoch)
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
        run.cbs.on_fit_end(state)
    except BaseException as exc:
        run.cbs.on_exception(state, exc)
        raise
    return state


def _prepare(model, loss_fn, train_loader, train_cfg, optim_cfg, step, callbacks) -> FitRun:
    """Device, optimiser, the cosine/constant schedule over the epochs before SWA, the callbacks."""
    from losslab.engine.callbacks import training_callbacks

    distributed = ddp.is_distributed()
    device = ddp.distributed_device(train_cfg.device) if distributed else resolve_device(train_cfg.device)
    model.to(device)
    loss_fn.to(device)
    optimizer = build_optimizer(model, loss_fn, optim_cfg)
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
    _set_rng_state(ckpt["rng"])
    log.info("resumed from %s at epoch %d", resume_from, ckpt["epoch"] + 1)
    return ckpt["epoch"] + 1


def _train_epoch(run: FitRun, state: FitState, epoch: int) -> dict[str, Any]:
    """One epoch of optimiser steps; returns the loss sum, samples seen, last lr, term sums and time."""
    cfg, model, loss_fn, step = run.train_cfg, run.model, run.loss_fn, run.step
    run.train_model.train()
    loss_fn.train()
    run.cbs.on_train_epoch_start(state)  # after train(): the frozen phase puts BN back in eval mode
    sleep_per_batch = float(os.environ.get(SLEEP_ENV) or 0.0)
    show_progress = bool(getattr(cfg, "progress", False)) and sys.stderr.isatty()
    t0 = time.perf_counter()
    loss_sum, seen, lr = 0.0, 0, run.optimizer.param_groups[-1]["lr"]
    term_sums: dict[str, float] = {}
    for b, batch in enumerate(_progress(run.train_loader, run.steps_per_epoch, f"epoch {epoch}", show_progress)):
        if cfg.max_train_batches is not None and b >= cfg.max_train_batches:
            break
        lam, target_b = 1.0, None
        if cfg.mixup_alpha > 0:
            batch, target_b, lam = mixup_batch(batch, cfg.mixup_alpha)
            target_b = target_b.to(run.device, non_blocking=True)
        target = step.target(batch, run.device)
        with autocast(run.device, cfg.amp):
            out = step.forward(run.train_model, batch, run.device)
        loss = compute_mixed_loss(loss_fn, out, target, target_b, lam, step)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"non-finite training loss ({float(loss.detach())}) at epoch {epoch}, batch {b}")
        lr = _optimizer_step(run, loss)
        state.global_step += 1
        batch_loss = float(loss.detach())
        size = step.size(target)
        loss_sum += batch_loss * size
        seen += size
        for k, v in (loss_fn.terms().items() if hasattr(loss_fn, "terms") else ()):
            term_sums[k] = term_sums.get(k, 0.0) + float(v) * size
        run.cbs.on_train_batch_end(state, b, batch_loss)
        if sleep_per_batch:
            time.sleep(sleep_per_batch)
    train_time = time.perf_counter() - t0
    if run.distributed:  # train/loss over every rank's samples
        term_keys = sorted(term_sums)
        totals = ddp.all_reduce_sum([loss_sum, seen] + [term_sums[k] for k in term_keys])
        loss_sum, seen = totals[0], int(totals[1])
        term_sums = dict(zip(term_keys, totals[2:]))
    return {"loss_sum": loss_sum, "seen": seen, "lr": lr, "term_sums": term_sums, "train_time": train_time}


def _optimizer_step(run: FitRun, loss: torch.Tensor) -> float:
    """Backward, gradient averaging of the loss's own weights under DDP, clipping, step, schedule;
    returns the head learning rate the step used."""
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
    from losslab.engine.callbacks import ModelCheckpoint
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
