"""What a task does with one batch: inputs → forward → loss → validation diagnostics.

The loop (:func:`losslab.engine.loop.fit`) owns time (epochs, steps, precision, clipping); a step
object owns what differs between tasks (MONAI's ``prepare_batch`` + ``_iteration``, Lightning's
``training_step``). :class:`ClassificationStep` is the plain classifier: ``model(image, mask)``
returning ``logits (B, K)`` or ``(logits, attention[, aux])`` and ``loss_fn(logits, label)``. Tasks
with more (the 2.5D ``level``, dual-stream logits, instance selection) subclass it in
:mod:`losslab.tasks`; the engine itself knows no model by name.
"""

from __future__ import annotations

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


class ClassificationStep:
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

    def size(self, target: Any) -> int:
        """Samples in a batch's target (the weight of its loss in the epoch mean)."""
        return len(target)

    def predict(self, model: nn.Module, loader, device: torch.device, loss_fn: nn.Module | None = None,
                amp: bool = False) -> dict[str, Any]:
        """The validation outputs over ``loader`` (:func:`losslab.engine.loop.predict`)."""
        from losslab.engine.loop import predict

        return predict(model, loader, device, loss_fn, amp, self)

    def metrics(self, outputs: dict[str, Any], class_names: list[str], loss_fn: nn.Module | None = None) -> dict[str, float]:
        """``val/*`` metrics of :meth:`predict`'s outputs (:func:`losslab.engine.loop.validation_metrics`)."""
        from losslab.engine.loop import validation_metrics

        return validation_metrics(outputs, class_names, loss_fn)
