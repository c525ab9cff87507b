"""What a task does with one batch: inputs → forward → loss → validation diagnostics.

The loop (:func:`losslab.engine.loop.fit`) owns time (epochs, steps, precision, clipping); a step
object owns what differs between tasks (MONAI's ``prepare_batch`` + ``_iteration``, Lightning's
``training_step``): :class:`Step` is that contract. :class:`ClassificationStep` is the plain classifier:
``model(image, mask)`` returning ``logits (B, K)`` or ``(logits, attention[, aux])`` and
``loss_fn(logits, label)``; a task builds its step (:meth:`losslab.tasks.Task.step`) from its loss and
output names, and hands it to the loop. The engine itself knows no model or task by name.

The validation pass every step shares lives here too (:func:`predict`, :func:`validation_metrics`,
:func:`autocast`), so that the callbacks and tasks use it without importing the loop.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class StepOutput:
    """A forward pass: ``logits (B, K)``, ``attention (B, N)`` or None, and model extras."""

    logits: torch.Tensor
    attention: torch.Tensor | None = None
    aux: dict[str, Any] = field(default_factory=dict)


class Step(abc.ABC):
    """What the loop asks of a task for one batch and one validation pass. A step holds everything it
    needs from its constructor (the loss, the output names, inference settings): nothing is set on it
    later, so its behaviour never depends on the order of calls."""

    @abc.abstractmethod
    def forward(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> StepOutput:
        """The model's forward pass on the batch's inputs, on ``device``."""

    @abc.abstractmethod
    def target(self, batch: dict[str, Any], device: torch.device) -> Any:
        """The batch's target on ``device``."""

    @abc.abstractmethod
    def loss(self, loss_fn: nn.Module, out: StepOutput, target: Any) -> torch.Tensor:
        """The training objective of one forward pass."""

    @abc.abstractmethod
    def predict(self, model: nn.Module, loader, device: torch.device, loss_fn: nn.Module | None = None,
                amp: bool = False) -> dict[str, Any]:
        """The validation outputs of ``model`` over ``loader`` (what :meth:`metrics` reads)."""

    @abc.abstractmethod
    def metrics(self, outputs: dict[str, Any], class_names: list[str], loss_fn: nn.Module | None = None
                ) -> dict[str, float]:
        """``val/*`` metrics of :meth:`predict`'s outputs."""

    def size(self, target: Any) -> int:
        """Samples in a batch's target (the weight of its loss in the epoch mean)."""
        return len(target)

    def mixup(self, batch: dict[str, Any], alpha: float) -> tuple[dict[str, Any], Any, float]:
        """``(mixed batch, the partners' targets, lam)`` for ``train.mixup_alpha`` (the loss is then
        ``lam * L(y_a) + (1 - lam) * L(y_b)``); refused by a step that cannot mix its batches."""
        raise ValueError(f"train.mixup_alpha={alpha}: {type(self).__name__} does not mix its batches; set it to 0")


class ClassificationStep(Step):
    """Batch dicts ``image``, optional ``mask``, ``label (B,)``; one loss on the logits."""

    def inputs(self, batch: dict[str, Any], device: torch.device) -> tuple[tuple, dict[str, Any]]:
        """Positional and keyword model inputs on ``device``: ``(image, mask)``."""
        image = batch["image"].to(device, non_blocking=True)
        mask = batch.get("mask")
        return (image, mask.to(device, non_blocking=True) if mask is not None else None), {}

    def forward(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> StepOutput:
        args, kwargs = self.inputs(batch, device)
        out = model(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return StepOutput(out)
        return StepOutput(out[0], out[1], out[2] if len(out) > 2 and out[2] is not None else {})

    def target(self, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        return batch["label"].to(device, non_blocking=True)

    def loss(self, loss_fn: nn.Module, out: StepOutput, target: torch.Tensor) -> torch.Tensor:
        """The training objective of one forward pass (float32 logits)."""
        return loss_fn(out.logits.float(), target)

    def batch_diagnostics(self, out: StepOutput, batch: dict[str, Any]) -> dict[str, float]:
        """Per-batch validation statistics averaged over samples into ``val/<name>`` (none here)."""
        return {}

    def predict(self, model: nn.Module, loader, device: torch.device, loss_fn: nn.Module | None = None,
                amp: bool = False) -> dict[str, Any]:
        """The validation outputs over ``loader`` (:func:`predict`)."""
        return predict(model, loader, device, loss_fn, amp, self)

    def metrics(self, outputs: dict[str, Any], class_names: list[str], loss_fn: nn.Module | None = None) -> dict[str, float]:
        """``val/*`` metrics of :meth:`predict`'s outputs (:func:`validation_metrics`)."""
        return validation_metrics(outputs, class_names, loss_fn)

    def mixup(self, batch: dict[str, Any], alpha: float) -> tuple[dict[str, Any], torch.Tensor, float]:
        """Mixup (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018, arXiv:1710.09412)
        of whole cases: each with another case of the batch; returns ``(mixed batch, labels_b, lam)``.

        ``lam ~ Beta(alpha, alpha)`` and the partner permutation come from torch's global generator
        (checkpointed with the other RNG states). ``image`` (bags ``(B, N, C, H, W)``: instance by
        instance, a zero-padded slot mixing with zeros) is ``lam * x_a + (1 - lam) * x_b``, ``mask``
        becomes the union, ``level`` (categorical) stays that of the first case. ``labels_b = label[perm]``.

        Raises:
            ValueError: ``alpha <= 0``.
        """
        if alpha <= 0:
            raise ValueError(f"mixup alpha must be > 0, got {alpha!r}")
        concentration = torch.tensor([float(alpha)])
        lam = float(torch.distributions.Beta(concentration, concentration).sample())
        label = batch["label"]
        perm = torch.randperm(len(label))
        out = dict(batch)
        image = batch["image"]
        out["image"] = lam * image + (1.0 - lam) * image[perm] if image.is_floating_point() else image
        if batch.get("mask") is not None:
            out["mask"] = batch["mask"] | batch["mask"][perm]
        return out, label[perm], lam


# ------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, loss_fn: nn.Module | None = None,
            amp: bool = False, step: ClassificationStep | None = None) -> dict[str, Any]:
    """Run the model over a loader through ``step``; return logits, probabilities, predictions,
    labels, attention, the mean loss and the step's diagnostics (sample-weighted means, NaN skipped)."""
    model.eval()
    step = step or ClassificationStep()
    logits_all, labels_all, attn_all, masks_all, index_all = [], [], [], [], []
    loss_sum, n = torch.zeros((), dtype=torch.float64), 0  # on the device after the first batch; read once
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
            loss_sum = loss_sum.to(out.logits.device) + step.loss(loss_fn, out, target).double() * len(target)
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
        "loss": float(loss_sum) / max(n, 1),
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
