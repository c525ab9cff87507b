"""Checkpoints: RNG states, an atomic write (temp file + fsync + ``os.replace``), a single background
writer thread, the finite-state check, loading with ``weights_only=True`` and the evaluation weights.

A checkpoint is a nested dict of tensors and plain values (model, EMA/SWA, optimiser, schedulers,
epoch, history, RNG states). Before it is written the loop checks that every floating-point tensor in
it is finite (:func:`non_finite_tensors`: one host read per device), copies it off the device
(:func:`to_cpu`) and hands the copy to :class:`CheckpointWriter`, which writes it while training
goes on. MLflow-free.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import random
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from losslab.engine.ema import averaged_weights

__all__ = ["CheckpointDiskFullError", "CheckpointWriter", "evaluation_weights", "load_checkpoint", "loss_from_spec",
           "loss_spec", "non_finite_tensors", "restore_loss", "rng_state", "save_checkpoint", "set_rng_state", "to_cpu"]

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CheckpointDiskFullError(OSError):
    """A checkpoint could not be written because its file system is full (or over quota)."""

    def __str__(self) -> str:
        return self.strerror or ""


def rng_state() -> dict[str, Any]:
    """torch, NumPy, Python (and CUDA) generator states, as tensors and plain values."""
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


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flat_tensors(value: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """``(dotted name, tensor)`` for every tensor in nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return [(prefix, value)]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return []
    out = []
    for key, item in items:
        out += _flat_tensors(item, f"{prefix}.{key}" if prefix else str(key))
    return out


def non_finite_tensors(payload: dict[str, Any]) -> list[str]:
    """Dotted names of the floating-point tensors of ``payload`` holding a NaN or an inf, in order.

    One ``all(isfinite)`` flag per tensor is computed where the tensor lives and the flags of each
    device are read back together (one host read per device)."""
    named = [(name, t) for name, t in _flat_tensors(payload) if t.is_floating_point() or t.is_complex()]
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in named:
        by_device.setdefault(tensor.device, []).append((name, tensor))
    bad = set()
    for group in by_device.values():
        flags = torch.stack([torch.isfinite(t.detach()).all() for _, t in group]).tolist()
        bad.update(name for (name, _), finite in zip(group, flags) if not finite)
    return [name for name, _ in named if name in bad]


def to_cpu(value: Any) -> Any:
    """A copy of nested dicts/lists/tuples whose tensors are detached copies in CPU memory (the
    training step goes on changing the originals in place)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_cpu(item) for item in value]
    if isinstance(value, tuple):
        return tuple(to_cpu(item) for item in value)
    return value


def _write_file(path: Path, data: memoryview) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _place_copies(tmp: Path, copies: tuple[Path, ...]) -> None:
    """Each copy gets ``tmp``'s bytes as a hard link (a copy where links are not possible)."""
    for target in map(Path, copies):
        target.parent.mkdir(parents=True, exist_ok=True)
        linked = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            linked.unlink()
        try:
            try:
                os.link(tmp, linked)
            except OSError as exc:  # no hard links here (or another device): copy the bytes
                if exc.errno in _DISK_FULL:
                    raise
                shutil.copyfile(tmp, linked)
            os.replace(linked, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                linked.unlink()
            raise


def save_checkpoint(path: Path, payload: dict[str, Any], copies: tuple[Path, ...] = ()) -> None:
    """Write atomically: serialise, write a temp file in the same folder, fsync, then ``os.replace``.

    ``copies``: more paths that get the same bytes, as hard links to the file just written (no second
    write: for a 14 M-parameter 3D model with AdamW state, 173 MB, that was half the checkpoint's time).
    A later ``os.replace`` of ``path`` gives it a new file and leaves the copies as they are. Where the
    file system has no hard links the bytes are written again.

    The payload is serialised in memory first, so that a failed write raises the file system's own
    ``OSError`` (``torch.save`` into a file turns it into an opaque ``RuntimeError``). On any failure
    no temporary file is left behind.

    Raises:
        CheckpointDiskFullError: the file system is full or over quota (one line naming ``path``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_file(tmp, buffer.getbuffer())
        _place_copies(tmp, copies)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if exc.errno in _DISK_FULL:
            raise CheckpointDiskFullError(
                exc.errno, f"disk full: cannot write checkpoint {path} ({os.strerror(exc.errno)}); "
                           f"free space there or set train.checkpoint_dir to a folder with room") from exc
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


class CheckpointWriter:
    """Writes checkpoints on one background thread, one at a time, in the order submitted.

    :meth:`submit` first waits for the previous write (raising its error); ``on_written`` runs on the
    submitting thread when a later :meth:`submit`, :meth:`wait` or :meth:`close` finds the write done.
    :meth:`close` waits for the last write and stops the thread."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="losslab-checkpoint")
        self._pending: tuple[Future, Callable[[], None] | None] | None = None
        self._lock = threading.Lock()

    def submit(self, path: Path, payload: dict[str, Any], copies: tuple[Path, ...] = (),
               on_written: Callable[[], None] | None = None) -> None:
        """Write ``payload`` (already on the CPU, not changed afterwards) to ``path`` and ``copies``."""
        self.wait()
        with self._lock:
            self._pending = (self._executor.submit(save_checkpoint, path, payload, copies), on_written)

    def raise_if_failed(self) -> None:
        """Raise the error of a finished write now (no waiting for one still running)."""
        with self._lock:
            pending = self._pending
        if pending is not None and pending[0].done():
            self.wait()

    def wait(self) -> None:
        """Wait for the write under way; raise its error, else call its ``on_written``."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        future, on_written = pending
        future.result()
        if on_written is not None:
            on_written()

    def close(self) -> None:
        """Wait for the last write (raising its error) and stop the thread."""
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code on load)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def evaluation_weights(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint was validated with: SWA, EMA or the trained model (``eval_source``)."""
    source = ckpt.get("eval_source", "model")
    if source == "model":
        return ckpt["model"]
    return averaged_weights(ckpt[source])


def restore_loss(loss_fn: torch.nn.Module, ckpt: dict[str, Any]) -> torch.nn.Module:
    """``loss_fn`` as it was when the checkpoint's weights were validated: its schedule at the
    checkpoint's epoch (``on_epoch_start``, e.g. LDAM's deferred re-weighting) and its state dict
    (learned term weights, buffers), when the checkpoint holds one."""
    if hasattr(loss_fn, "on_epoch_start") and ckpt.get("epoch") is not None:
        loss_fn.on_epoch_start(int(ckpt["epoch"]))
    if ckpt.get("loss") is not None:
        loss_fn.load_state_dict(ckpt["loss"])
    return loss_fn


def loss_spec(loss_fn: torch.nn.Module, epoch: int | None) -> dict[str, Any]:
    """What a registered model's JSON spec carries so that :func:`loss_from_spec` rebuilds the loss as
    :func:`restore_loss` left it: ``loss_epoch`` and ``loss_state`` (each tensor's dtype, shape and
    values; a float32 value written as a JSON float reads back exactly)."""
    state = {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                    "values": t.detach().cpu().flatten().tolist()} for name, t in loss_fn.state_dict().items()}
    return {"loss_epoch": epoch, "loss_state": state}


def loss_from_spec(loss_fn: torch.nn.Module, spec: dict[str, Any]) -> torch.nn.Module:
    """``loss_fn`` (built from the spec's ``loss`` section) with the ``loss_epoch`` and ``loss_state``
    of :func:`loss_spec`; a spec without them (registered before) leaves it as built."""
    state = {name: torch.tensor(t["values"], dtype=getattr(torch, t["dtype"])).reshape(t["shape"])
             for name, t in (spec.get("loss_state") or {}).items()}
    return restore_loss(loss_fn, {"epoch": spec.get("loss_epoch"), "loss": state or None})
