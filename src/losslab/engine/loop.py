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

import io
import logging
import math
import os
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
from losslab.engine.callbacks import Callback, CallbackList
from losslab.engine.ema import averaged_weights, build_ema, build_swa, mixup_batch, update_bn
from losslab.engine.monitor import BestModelRule
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
    """Write atomically: a temp file in the same folder, fsync, then ``os.replace``.

    ``copies``: more paths that get the same bytes (serialised once)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getbuffer()
    for target in (Path(path), *map(Path, copies)):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)


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
        with _autocast(device, amp):
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


def _autocast(device: torch.device, amp: bool):
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

    Args:
        model: returns ``(logits (B, K), attention, [aux])`` from ``(image, mask[, level])``; an
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
    from losslab.engine.metrics import Alarms, dead_class_names, pred_counts

    cbs = CallbackList(callbacks)
    step = step or ClassificationStep()
    distributed = ddp.is_distributed()
    is_main = ddp.is_main_process()
    if distributed and train_cfg.freeze_backbone_epochs > 0:
        # toggling requires_grad on a DDP-wrapped model breaks its gradient reduction
        raise ValueError(f"train.freeze_backbone_epochs={train_cfg.freeze_backbone_epochs} is not supported under "
                         "torchrun/DDP; set train.freeze_backbone_epochs=0 or train in one process")
    device = ddp.distributed_device(train_cfg.device) if distributed else resolve_device(train_cfg.device)
    model.to(device)
    loss_fn.to(device)
    optimizer = build_optimizer(model, loss_fn, optim_cfg)
    steps_per_epoch = len(train_loader) if train_cfg.max_train_batches is None else min(len(train_loader), train_cfg.max_train_batches)
    swa_epochs = min(train_cfg.swa_epochs, train_cfg.epochs)
    swa_start = train_cfg.epochs - swa_epochs if swa_epochs else None
    # the cosine decays over the epochs before SWA; SWA runs at a constant swa_lr
    total_steps = steps_per_epoch * max(1, train_cfg.epochs - swa_epochs)
    if optim_cfg.scheduler == "cosine":
        factor = cosine_with_warmup(total_steps, optim_cfg.warmup_epochs * steps_per_epoch, optim_cfg.min_lr_ratio)
    else:
        factor = lambda step: 1.0  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    ema = build_ema(model, train_cfg.ema_decay) if train_cfg.ema_decay is not None else None
    swa_model = build_swa(model) if swa_epochs else None
    swa_scheduler = None
    state = FitState(checkpoint_dir=Path(train_cfg.checkpoint_dir))
    alarms = Alarms(dead_class_patience=train_cfg.dead_class_patience, loss_gap_threshold=train_cfg.loss_gap_threshold,
                    bal_acc_var_window=train_cfg.bal_acc_var_window, bal_acc_var_threshold=train_cfg.bal_acc_var_threshold)
    best_rule = BestModelRule.from_config(train_cfg)
    patience_left = train_cfg.early_stopping_patience
    start_epoch = 0
    sleep_per_batch = float(os.environ.get(SLEEP_ENV) or 0.0)
    show_progress = bool(getattr(train_cfg, "progress", False)) and sys.stderr.isatty()

    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        model.load_state_dict(ckpt["model"])
        if ckpt.get("loss") is not None:
            loss_fn.load_state_dict(ckpt["loss"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        if swa_model is not None and ckpt.get("swa") is not None:
            swa_model.load_state_dict(ckpt["swa"])
        if ckpt.get("swa_scheduler") is not None:
            lrs = [group["lr"] for group in optimizer.param_groups]
            swa_scheduler = _build_swalr(optimizer, train_cfg, optim_cfg)  # its first step moves the lr ...
            swa_scheduler.load_state_dict(ckpt["swa_scheduler"])
            for group, lr in zip(optimizer.param_groups, lrs):  # ... so put back the saved one
                group["lr"] = lr
        state.epoch = ckpt["epoch"]
        state.global_step = ckpt["global_step"]
        state.best_metric = ckpt["best_metric"]
        state.best_epoch = ckpt["best_epoch"]
        state.best_values = ckpt.get("best_values") or (
            {train_cfg.monitor: ckpt["best_metric"]} if ckpt["best_metric"] is not None else None)
        state.best_tiebreak = ckpt.get("best_tiebreak")
        state.history = {k: list(v) for k, v in ckpt["history"].items()}
        patience_left = ckpt.get("patience_left", patience_left)
        _replay_alarms(alarms, state.history)
        _set_rng_state(ckpt["rng"])
        start_epoch = ckpt["epoch"] + 1
        log.info("resumed from %s at epoch %d", resume_from, start_epoch)

    # DDP (torchrun): train_model averages gradients over ranks; `model` stays the plain module for
    # EMA/SWA, state dicts (interchangeable with single-process checkpoints) and validation
    train_model = ddp.wrap_model(model, device)
    samplers = [s for s in (getattr(train_loader, "sampler", None), getattr(train_loader, "batch_sampler", None))
                if hasattr(s, "set_epoch")]

    try:
        cbs.on_fit_start(state)
        for epoch in range(start_epoch, train_cfg.epochs):
            state.epoch = epoch
            in_swa = swa_start is not None and epoch >= swa_start
            if in_swa and swa_scheduler is None:
                swa_scheduler = _build_swalr(optimizer, train_cfg, optim_cfg)
            frozen = epoch < train_cfg.freeze_backbone_epochs
            if hasattr(loss_fn, "on_epoch_start"):
                loss_fn.on_epoch_start(epoch)
            cbs.on_epoch_start(state)
            for sampler in samplers:  # distributed samplers: a new, rank-consistent epoch
                sampler.set_epoch(epoch)
            train_model.train()
            loss_fn.train()
            set_backbone_frozen(model, frozen)
            t0 = time.perf_counter()
            loss_sum, seen, lr = 0.0, 0, optimizer.param_groups[-1]["lr"]
            term_sums: dict[str, float] = {}
            batches = _progress(train_loader, steps_per_epoch, f"epoch {epoch}", show_progress)
            for b, batch in enumerate(batches):
                if train_cfg.max_train_batches is not None and b >= train_cfg.max_train_batches:
                    break
                lam, target_b = 1.0, None
                if train_cfg.mixup_alpha > 0:
                    batch, target_b, lam = mixup_batch(batch, train_cfg.mixup_alpha)
                    target_b = target_b.to(device, non_blocking=True)
                target = step.target(batch, device)
                with _autocast(device, train_cfg.amp):
                    out = step.forward(train_model, batch, device)
                loss = compute_mixed_loss(loss_fn, out, target, target_b, lam, step)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"non-finite training loss ({float(loss.detach())}) at epoch {epoch}, batch {b}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if distributed:  # the loss's own learnable weights are outside DDP
                    ddp.all_reduce_mean_grads([p for p in loss_fn.parameters() if p.requires_grad])
                if train_cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
                lr = optimizer.param_groups[-1]["lr"]  # logged: the head lr of the epoch's last step
                optimizer.step()
                if not in_swa:
                    scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
                state.global_step += 1
                batch_loss = float(loss.detach())
                loss_sum += batch_loss * len(target)
                seen += len(target)
                if hasattr(loss_fn, "terms"):
                    for k, v in loss_fn.terms().items():
                        term_sums[k] = term_sums.get(k, 0.0) + float(v) * len(target)
                cbs.on_train_batch_end(state, b, batch_loss)
                if sleep_per_batch:
                    time.sleep(sleep_per_batch)
            train_time = time.perf_counter() - t0
            if distributed:  # train/loss over every rank's samples
                term_keys = sorted(term_sums)
                totals = ddp.all_reduce_sum([loss_sum, seen] + [term_sums[k] for k in term_keys])
                loss_sum, seen = totals[0], int(totals[1])
                term_sums = dict(zip(term_keys, totals[2:]))
            if in_swa:
                swa_model.update_parameters(model)
                swa_scheduler.step()
                if is_main:  # BN statistics from rank 0's shard: only rank 0 validates
                    update_bn(train_loader, swa_model.module, device, train_cfg.max_train_batches)
                eval_model, eval_source = swa_model.module, "swa"
            elif ema is not None:
                eval_model, eval_source = ema.module, "ema"
            else:
                eval_model, eval_source = model, "model"
            # Under DDP rank 0 validates on the whole validation set, checkpoints and calls the callbacks while
            # the other ranks wait in the broadcast of its early-stop decision, so that all ranks stop together.
            if is_main:
                outputs = predict(eval_model, val_loader, device, loss_fn, train_cfg.amp, step)
                metrics = {"train/loss": loss_sum / max(seen, 1), "train/epoch_time_s": train_time, "train/lr": lr}
                metrics.update({f"train/loss_{k}": v / max(seen, 1) for k, v in term_sums.items()})
                if hasattr(loss_fn, "weights"):
                    metrics.update({f"loss_weight/{k}": float(v) for k, v in loss_fn.weights().items()})
                metrics.update(_class_weight_metrics(loss_fn, class_names))
                metrics.update(validation_metrics(outputs, class_names, loss_fn))
                for k, v in metrics.items():
                    state.history.setdefault(k, []).append(float(v))
                state.last_val_outputs = outputs
                zero = dead_class_names(pred_counts(metrics))
                if zero:
                    log.warning("epoch %d: class(es) %s predicted 0 times on validation", epoch, ", ".join(zero))
                for alarm in alarms.update(epoch, metrics):
                    log.warning("epoch %d: %s", epoch, alarm.message)
                    cbs.on_alarm(state, alarm)

                monitored = metrics.get(train_cfg.monitor)
                if monitored is None:
                    raise KeyError(f"train.monitor {train_cfg.monitor!r} is not a logged metric; available: {sorted(metrics)}")
                improved, tiebreak = best_rule.compare(metrics, state.best_values)
                if improved:
                    state.best_metric, state.best_epoch = float(monitored), epoch
                    state.best_values, state.best_tiebreak = best_rule.remember(metrics), tiebreak
                    if tiebreak:
                        log.info("epoch %d becomes best by tie-break: %s", epoch, tiebreak)
                    patience_left = train_cfg.early_stopping_patience
                elif patience_left is not None:
                    patience_left -= 1
                payload = {
                    "model": model.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "swa": swa_model.state_dict() if swa_model is not None and in_swa else None,
                    "eval_source": eval_source,
                    "loss": loss_fn.state_dict() if any(True for _ in loss_fn.state_dict()) else None,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "swa_scheduler": swa_scheduler.state_dict() if swa_scheduler is not None else None,
                    "epoch": epoch,
                    "global_step": state.global_step,
                    "best_metric": state.best_metric,
                    "best_epoch": state.best_epoch,
                    "best_values": state.best_values,
                    "best_tiebreak": state.best_tiebreak,
                    "history": state.history,
                    "patience_left": patience_left,
                    "rng": _rng_state(),
                }
                best_path, last_path = state.checkpoint_dir / "best.pt", state.checkpoint_dir / "last.pt"
                save_checkpoint(last_path, payload, copies=(best_path,) if improved else ())
                if improved:
                    cbs.on_checkpoint(state, best_path, "best")
                cbs.on_checkpoint(state, last_path, "last")
                metrics["epoch"] = epoch
                cbs.on_epoch_end(state, metrics)
                if not improved and patience_left is not None and patience_left <= 0:
                    state.stopped_early = True
                    log.info("early stopping at epoch %d (best %s=%.4f at epoch %s)", epoch, train_cfg.monitor,
                             state.best_metric, state.best_epoch)
            if distributed:
                state.stopped_early = bool(ddp.broadcast_object(state.stopped_early))
            if state.stopped_early:
                break
        cbs.on_fit_end(state)
    except BaseException as exc:
        cbs.on_exception(state, exc)
        raise
    return state


def _build_swalr(optimizer: torch.optim.Optimizer, train_cfg: Any, optim_cfg: Any):
    """SWALR at a constant ``train.swa_lr`` (default ``optim.lr / 2``) from the first SWA epoch on;
    the backbone group keeps its ratio ``backbone_lr / lr``."""
    from torch.optim.swa_utils import SWALR

    swa_lr = train_cfg.swa_lr or 0.5 * optim_cfg.lr
    ratio = (optim_cfg.backbone_lr or optim_cfg.lr) / optim_cfg.lr
    lrs = [swa_lr * ratio if group.get("name") == "backbone" else swa_lr for group in optimizer.param_groups]
    return SWALR(optimizer, swa_lr=lrs, anneal_epochs=0)


def _replay_alarms(alarms: Any, history: dict[str, list[float]]) -> None:
    """Feed the epochs before a resume to fresh alarms (silently: they fired in the first process)."""
    n = max((len(v) for v in history.values()), default=0)
    for epoch in range(n):
        alarms.update(epoch, {k: v[epoch] for k, v in history.items() if len(v) == n})


def _progress(loader, total: int, desc: str, enabled: bool):
    if not enabled:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, total=total, desc=desc, leave=False, dynamic_ncols=True)
