"""DataLoaders for the datasets of :mod:`losslab.data.datasets`, from the ``data`` config section.

Two ways to deliver the training batches (``data.train_data_on_device``):

* ``false`` (default): a torch ``DataLoader``. ``data.num_workers`` processes (``auto``: see
  :func:`resolve_num_workers`) run the items' random part (bag sampling, augmentation); with workers
  they stay alive between epochs (``persistent_workers``) and keep ``prefetch_factor`` batches ready,
  and on CUDA the batches come in pinned memory (``pin_memory``) for asynchronous copies.
* ``true``: :class:`DeviceBatchLoader`. The training split's prepared arrays are copied to the
  training device once; a batch is then an index gather there, with no worker, no collation on
  the host and no host-to-device copy. The batch order and the random bag draws are those of the
  plain loader with the same sampler and torch RNG state (the same batches). Items must be
  deterministic apart from the bag draw: no ``data.augment``.

Shapes of a batch are those of the dataset's items stacked: bags ``image (B, N, C, H, W)``,
``mask (B, N)``, ``instance_index (B, N)``; images ``(B, C, H, W)``; volumes ``(B, C, D, H, W)``;
``label (B,)`` and ``index (B,)`` always.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

#: batches each loader worker keeps ready (torch's default is 2)
PREFETCH_FACTOR = 4
#: share of the device's free memory the training split may take on the device
DEVICE_MEMORY_SHARE = 0.5


def resolve_num_workers(num_workers: int | str) -> int:
    """``data.num_workers``: an int as given; ``auto``: 0 on up to 2 usable cores (the prepared
    items are copies, cheaper in the main process than shipped from a worker), else half the cores
    (the other half for the main process and its torch threads), at most 8."""
    if num_workers == "auto":
        cores = len(os.sched_getaffinity(0))
        return 0 if cores <= 2 else min(8, cores // 2)
    if isinstance(num_workers, int) and num_workers >= 0:
        return num_workers
    raise ValueError(f"data.num_workers must be an int >= 0 or 'auto', got {num_workers!r}")


def build_loader(dataset: Dataset, data_cfg: Any, train: bool, collate_fn: Callable | None = None,
                 sampler: Sampler | None = None, batch_sampler: Sampler | None = None,
                 device: torch.device | None = None, *, batch_size: int | None = None, num_workers: int | None = None,
                 generator: torch.Generator | None = None, loader_class: type[DataLoader] = DataLoader,
                 persistent_workers: bool = True) -> Any:
    """The one way every task builds a loader: the training (``train=True``: shuffled unless a sampler is
    given) or evaluation loader of ``dataset``.

    Args:
        data_cfg: the ``data`` section: ``batch_size`` (unless ``batch_size`` is given), ``num_workers``
            (unless ``num_workers`` is given; ``auto``: :func:`resolve_num_workers`) and
            ``train_data_on_device`` (a training split on the device: :class:`DeviceBatchLoader`).
        device: the training device (pinned memory on CUDA; the device of ``data.train_data_on_device``).
        generator: the shuffle's own generator (else torch's global one).
        loader_class: ``torch.utils.data.DataLoader`` or a subclass (MONAI's, for dictionary transforms).
        persistent_workers: keep the workers between epochs (False when each epoch reseeds what the
            workers draw: a persistent worker would not see it).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    batch_size = data_cfg.batch_size if batch_size is None else batch_size
    if train and data_cfg.train_data_on_device:
        return DeviceBatchLoader(dataset, batch_size, device, sampler, batch_sampler)
    workers = resolve_num_workers(data_cfg.num_workers if num_workers is None else num_workers)
    options: dict[str, Any] = dict(num_workers=workers, collate_fn=collate_fn, pin_memory=device.type == "cuda")
    if generator is not None:
        options["generator"] = generator
    if workers > 0:
        options.update(persistent_workers=persistent_workers, prefetch_factor=PREFETCH_FACTOR)
    if batch_sampler is not None:
        return loader_class(dataset, batch_sampler=batch_sampler, **options)
    shuffle = train and sampler is None
    return loader_class(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle, **options)


class _Positions(Dataset):
    """``0 .. n-1``: the sampler's indices, drawn through a DataLoader as the plain loader draws them."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _on_device(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """A dataset's ``device_arrays()`` on ``device``; refused when they would take more than
    :data:`DEVICE_MEMORY_SHARE` of its free memory."""
    size = sum(a.nbytes for a in arrays.values())
    if device.type == "cuda" and size > DEVICE_MEMORY_SHARE * torch.cuda.mem_get_info(device)[0]:
        raise ValueError(f"data.train_data_on_device: the training split takes {size / 2**30:.2f} GiB, more than "
                         f"{DEVICE_MEMORY_SHARE:.0%} of the free memory of {device}; set it to false")
    return {key: torch.from_numpy(np.ascontiguousarray(a)).to(device) for key, a in arrays.items()}


class DeviceBatchLoader:
    """Training batches gathered on ``device`` from the split's prepared arrays (module docstring).

    Iterating draws the batches' indices through a ``DataLoader`` of positions with the same
    ``sampler`` / ``batch_sampler`` / shuffling as the plain loader, then (bags) each case's
    instances (the dataset's ``instance_rows``), in the same order, so the torch RNG is consumed
    exactly as by the plain loader with ``num_workers=0``. The dataset gives the arrays kept on the
    device (its ``device_arrays()``: ``cases`` as its items are, or the bags' ``instances``)."""

    def __init__(self, dataset: Dataset, batch_size: int, device: torch.device, sampler: Sampler | None = None,
                 batch_sampler: Sampler | None = None) -> None:
        if getattr(dataset, "transform", None) is not None:
            raise ValueError("data.train_data_on_device needs deterministic items: set data.augment to {} "
                             "(augmentation runs per item in the plain loader)")
        self.dataset = dataset
        self.device = torch.device(device)
        self.arrays = _on_device(dataset.device_arrays(), self.device)
        self.case_sizes = [len(p) for p in dataset.prepared_cases()]  # instances per case (bags)
        self.case_offsets = np.cumsum([0] + self.case_sizes[:-1]).astype(np.int64)  # each case's first row
        if batch_sampler is not None:
            self.positions = DataLoader(_Positions(len(dataset)), batch_sampler=batch_sampler, collate_fn=list)
        else:
            self.positions = DataLoader(_Positions(len(dataset)), batch_size=batch_size, sampler=sampler,
                                        shuffle=sampler is None, collate_fn=list)

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def sampler(self) -> Sampler:
        """The sampler the positions are drawn with (``fit`` calls its ``set_epoch`` under DDP)."""
        return self.positions.sampler

    @property
    def batch_sampler(self) -> Sampler:
        return self.positions.batch_sampler

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for positions in self.positions:
            yield self.batch(positions)

    def batch(self, positions: list[int]) -> dict[str, torch.Tensor]:
        """The batch of the cases at ``positions`` (for bags: a fresh draw of instances)."""
        index = torch.as_tensor(positions, dtype=torch.int64)
        on_device = index.to(self.device, non_blocking=True)
        out = {"label": self.arrays["labels"][on_device], "index": index.to(self.device)}
        if "cases" in self.arrays:
            out["image"] = self.arrays["cases"][on_device]
            return out
        return {**self._bags(positions), **out}

    def _bags(self, positions: list[int]) -> dict[str, torch.Tensor]:
        """``image``, ``mask`` and ``instance_index`` of the bags at ``positions``: the instance rows
        are chosen on the host (small integers), the images gathered on the device."""
        instance_index = self.dataset.instance_rows([self.case_sizes[i] for i in positions])
        width = instance_index.shape[1]
        offsets = self.case_offsets[positions][:, None]
        blank_row = self.arrays["instances"].shape[0] - 1
        rows = torch.from_numpy(np.where(instance_index >= 0, instance_index + offsets, blank_row))
        images = self.arrays["instances"][rows.to(self.device).reshape(-1)]
        instance_tensor = torch.from_numpy(instance_index).to(self.device)
        return {"image": images.reshape((len(positions), width) + images.shape[1:]), "mask": instance_tensor >= 0,
                "instance_index": instance_tensor}
