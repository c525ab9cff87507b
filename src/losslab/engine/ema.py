"""Weight averaging (EMA, SWA) for the training loop. MLflow-free.

* :func:`build_ema` — an exponential moving average of the weights,
  ``theta_ema <- decay * theta_ema + (1 - decay) * theta`` after every optimiser step (the first
  update copies the weights), on parameters *and* buffers (BN statistics), via
  :class:`torch.optim.swa_utils.AveragedModel` with ``get_ema_multi_avg_fn``.
* :func:`build_swa` — the equal-weight average of the weights at the end of each of the last
  epochs (Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
  UAI 2018, arXiv:1803.05407); its BatchNorm statistics are re-estimated by :func:`update_bn`.
* :func:`update_bn` — :func:`torch.optim.swa_utils.update_bn` for our dict batches, fed through the
  task's step.

Mixup is the step's (:meth:`losslab.engine.steps.Step.mixup`): only the task knows its batch's keys.

All state is tensors, so checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["averaged_weights", "build_ema", "build_swa", "update_bn", "update_ema"]


def build_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA copy of ``model`` (parameters and buffers); call ``update_parameters(model)`` per step.

    Args:
        decay: in ``[0, 1]``; 0 follows the model exactly, 1 keeps the weights of the first update.

    Raises:
        ValueError: ``decay`` outside ``[0, 1]``.
    """
    if not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"ema decay must be in [0, 1], got {decay!r}")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(float(decay)), use_buffers=True)


@torch.no_grad()
def update_ema(ema: AveragedModel, model: nn.Module, decay: float, first: bool) -> None:
    """One EMA step of a :func:`build_ema` copy, the same arithmetic as its ``update_parameters``
    (copy on the first update, then ``lerp`` towards the model; integer buffers as torch does them)
    but written by hand because that method reads ``n_averaged`` on the host twice per call (a device
    sync on a GPU); ``first`` says on the host whether this is the first update."""
    pairs = [(e.detach(), m.detach()) for e, m in zip(itertools.chain(ema.module.parameters(), ema.module.buffers()),
                                                      itertools.chain(model.parameters(), model.buffers()))]
    if first:
        torch._foreach_copy_([e for e, _ in pairs], [m for _, m in pairs])
    else:
        floats = [(e, m) for e, m in pairs if e.is_floating_point() or e.is_complex()]
        torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1.0 - decay)
        for e, m in pairs:
            if not (e.is_floating_point() or e.is_complex()):
                e.copy_(e * decay + m * (1.0 - decay))
    ema.n_averaged += 1


def build_swa(model: nn.Module) -> AveragedModel:
    """An equal-weight running average of ``model``'s parameters (buffers: see :func:`update_bn`)."""
    return AveragedModel(model, use_buffers=False)


def averaged_weights(averaged_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The wrapped model's state dict from an ``AveragedModel`` state dict (drops ``n_averaged``)."""
    return {k[len("module."):]: v for k, v in averaged_state.items() if k.startswith("module.")}


@torch.no_grad()
def update_bn(loader, model: nn.Module, device: torch.device, max_batches: int | None = None, step: Any = None) -> None:
    """Re-estimate BatchNorm running statistics with one pass over ``loader`` (dict batches).

    Same as :func:`torch.optim.swa_utils.update_bn` (reset statistics, cumulative average via
    ``momentum=None``, restore the momenta and the train/eval mode) but it feeds each batch through the
    task's ``step`` (:class:`losslab.engine.steps.Step`; default the plain classifier's).
    """
    from losslab.engine.steps import ClassificationStep

    step = step or ClassificationStep()
    momenta = {}
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            momenta[module] = module.momentum
    if not momenta:
        return
    was_training = model.training
    model.train()
    for module in momenta:
        module.momentum = None
    for b, batch in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        step.forward(model, batch, device)
    for module, momentum in momenta.items():
        module.momentum = momentum
    model.train(was_training)
