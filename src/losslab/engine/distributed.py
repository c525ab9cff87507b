"""Multi-process training under ``torchrun`` (DistributedDataParallel). MLflow-free.

``torchrun`` starts one process per device and sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``;
with ``WORLD_SIZE > 1`` the train pipeline enters :func:`distributed_context`, which initialises the
process group (``nccl`` when training on CUDA, ``gloo`` on CPU; ``LOCAL_RANK`` picks the GPU) and
destroys it on the way out, also on error. Without those variables everything here is a no-op and
rank 0 of a world of 1.

Who does what (see :func:`losslab.engine.loop.fit`):

* every rank trains on its shard of the data (``data.batch_size`` per rank: the effective batch is
  ``world_size × data.batch_size``; the learning rate is *not* scaled) and DDP averages gradients;
* rank 0 alone validates on the whole validation set, writes checkpoints, calls the callbacks and
  (in the pipeline) talks to MLflow; the others wait and receive its early-stop decision.

A failure on rank 0 ends its MLflow run FAILED (the pipeline's ``managed_run``). When another rank
fails, torchrun terminates the whole group (SIGTERM, then SIGKILL after its grace period): under
:func:`distributed_context` SIGTERM raises :class:`TerminatedError` in each rank, so rank 0 ends the
run FAILED with that reason as long as its Python code gets to run (a rank stuck inside a collective
may be SIGKILLed first: the run then stays RUNNING and ``losslab train --resume <run id>`` continues it).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["TerminatedError", "all_gather_rows", "all_reduce_sum", "barrier", "broadcast_object", "distributed_context", "is_distributed",
           "is_main_process", "local_rank", "rank", "world_size", "wrap_model"]


class TerminatedError(RuntimeError):
    """SIGTERM under torchrun: usually another rank failed and torchrun is stopping the group."""


def _raise_terminated(signum, frame):  # noqa: ARG001
    raise TerminatedError(f"rank {rank()} got SIGTERM (torchrun stops every rank when one fails; "
                          "see the failing rank's traceback in torchrun's output)")


def world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    """The global rank ``RANK`` (0 without torchrun)."""
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    """The rank on this machine ``LOCAL_RANK`` (0 without torchrun): the GPU index on CUDA."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    """True on rank 0 (and in a plain single-process run): the one that logs and checkpoints."""
    return rank() == 0


def is_distributed() -> bool:
    """True when a process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def distributed_device(name: str) -> torch.device:
    """The device of this rank for ``train.device`` ``name`` (``auto``/``cpu``/``cuda``): on CUDA,
    ``cuda:LOCAL_RANK`` under torchrun."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and world_size() > 1:
        device = torch.device("cuda", local_rank())
    return device


@contextlib.contextmanager
def distributed_context(device_name: str, timeout_s: float = 1800.0) -> Iterator[bool]:
    """Initialise the process group when ``WORLD_SIZE > 1`` (yields True) and destroy it at the end,
    also on error; a no-op yielding False otherwise or when a group already exists (its owner
    cleans up).

    Args:
        device_name: ``train.device``; CUDA → ``nccl`` and ``torch.cuda.set_device(LOCAL_RANK)``,
            CPU → ``gloo``.
        timeout_s: how long a collective waits for the other ranks.
    """
    if world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        yield False
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    device = distributed_device(device_name)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("DDP: rank %d/%d (local %d), backend %s, device %s", rank(), world_size(), local_rank(), backend, device)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)  # so that rank 0 can end its run FAILED
    try:
        yield True
    finally:
        signal.signal(signal.SIGTERM, previous)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when distributed, else ``model`` itself.

    ``find_unused_parameters`` is off (it costs a graph traversal per step); set
    ``LOSSLAB_DDP_FIND_UNUSED=1`` for a model whose forward leaves some parameters without gradients
    (DDP then says so in its error)."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    find_unused = os.environ.get("LOSSLAB_DDP_FIND_UNUSED", "") not in ("", "0")
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` from rank ``src`` on every rank (picklable objects; identity when not distributed)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64 on CPU for gloo, on the current GPU for nccl)."""
    if not is_distributed():
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def all_gather_rows(values: torch.Tensor) -> torch.Tensor:
    """``(world_size, *values.shape)``: every rank's ``values`` (on their device: CPU for gloo, this rank's
    GPU for nccl), in rank order; ``values[None]`` when not distributed."""
    if not is_distributed():
        return values[None]
    rows = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, values.contiguous())
    return torch.stack(rows)


def all_reduce_mean_grads(params) -> None:
    """Average the gradients of parameters that DDP does not own (e.g. a loss's learnable weights)."""
    if not is_distributed():
        return
    n = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(n)
