"""The data path of issue #23: deterministic work happens once per case (no per-epoch resampling),
items keep their values, ``data.num_workers: auto`` and the loader options, and the training split
on the device (``data.train_data_on_device``) gives the plain loader's batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from losslab.config import DataConfig
from losslab.data.datasets import BagDataset, VolumeDataset, collate_padded
from losslab.data.loaders import DeviceBatchLoader, build_loader, resolve_num_workers


def _zscore(row, raw: np.ndarray) -> np.ndarray:
    """Per-case, per-channel z-score over the non-zero voxels, written out here (a second code path)."""
    mean = np.asarray(row["channel_mean"], dtype=np.float32)[None, :, None, None]
    std = np.asarray(row["channel_std"], dtype=np.float32)[None, :, None, None]
    return np.where(raw != 0, (raw - mean) / std, 0.0).astype(np.float32)


def test_volumes_are_resampled_once_per_case_not_per_epoch(small_cache, monkeypatch):
    from monai.transforms import Resize

    calls = []
    original = Resize.__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Resize, "__call__", counting)
    rows = small_cache.index[small_cache.index["fold"] >= 0]
    dataset = VolumeDataset(rows, small_cache.cache_dir, depth=8, size=(24, 24))
    loader = DataLoader(dataset, batch_size=4, shuffle=True)
    for _ in range(2):
        seen = sum(len(batch["label"]) for batch in loader)
        assert seen == len(rows)
    assert len(calls) == len(rows)  # one resample per case at construction, none during the two epochs


def test_volume_items_equal_monai_resize_of_the_normalised_case(small_cache):
    from monai.transforms import Resize

    rows = small_cache.index[small_cache.index["fold"] == 0].reset_index(drop=True)
    dataset = VolumeDataset(rows, small_cache.cache_dir, depth=8, size=(24, 20))
    resize = Resize(spatial_size=(8, 24, 20), mode="trilinear", align_corners=False)
    for i in (0, len(rows) - 1):
        raw = np.load(Path(small_cache.cache_dir) / rows.iloc[i]["array_path"])  # (D, C, H, W)
        by_hand = torch.as_tensor(resize(torch.from_numpy(_zscore(rows.iloc[i], raw).transpose(1, 0, 2, 3))))
        item = dataset[i]["image"]
        assert item.shape == (4, 8, 24, 20)
        torch.testing.assert_close(item, by_hand.float(), rtol=1e-5, atol=1e-5)
        assert int(dataset[i]["label"]) == int(rows.iloc[i]["label"])


def test_an_item_is_a_copy_the_prepared_case_never_changes(small_cache):
    rows = small_cache.index[small_cache.index["fold"] == 0]
    dataset = VolumeDataset(rows, small_cache.cache_dir, depth=8)
    first = dataset[0]["image"]
    expected = first.clone()
    first.fill_(7.0)
    torch.testing.assert_close(dataset[0]["image"], expected)


def test_bag_items_are_the_chosen_normalised_slices_with_padding(small_cache):
    rows = small_cache.index[small_cache.index["fold"] == 0].reset_index(drop=True)
    raw = np.load(Path(small_cache.cache_dir) / rows.iloc[0]["array_path"])
    n = raw.shape[0]
    spaced = BagDataset(rows, small_cache.cache_dir, bag_size=5, sampling="evenly_spaced")[0]
    chosen = np.unique(np.linspace(0, n - 1, 5).round().astype(int))
    np.testing.assert_allclose(spaced["image"].numpy(), _zscore(rows.iloc[0], raw)[chosen], rtol=1e-6, atol=1e-6)
    padded = BagDataset(rows, small_cache.cache_dir, bag_size=n + 3, sampling="random")[0]
    np.testing.assert_allclose(padded["image"][:n].numpy(), _zscore(rows.iloc[0], raw), rtol=1e-6, atol=1e-6)
    assert float(padded["image"][n:].abs().sum()) == 0.0
    assert padded["mask"].tolist() == [True] * n + [False] * 3
    assert padded["instance_index"].tolist() == list(range(n)) + [-1] * 3


def _same_batches(plain, on_device) -> None:
    plain_batches, device_batches = list(plain), list(on_device)
    assert len(plain_batches) == len(device_batches) == len(on_device)
    for a, b in zip(plain_batches, device_batches):
        assert sorted(a) == sorted(b)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)


def test_bags_on_the_device_are_the_plain_loaders_batches(small_cache):
    rows = small_cache.index[small_cache.index["fold"] >= 0].reset_index(drop=True)
    dataset = BagDataset(rows, small_cache.cache_dir, bag_size=4, sampling="random")
    weights = np.where(dataset.labels == 1, 3.0, 1.0)
    sampler = WeightedRandomSampler(weights, num_samples=len(dataset))
    cfg = DataConfig(batch_size=3, train_data_on_device=True)
    on_device = build_loader(dataset, cfg, True, collate_padded, sampler=sampler)
    assert isinstance(on_device, DeviceBatchLoader) and on_device.sampler is sampler  # fit's set_epoch finds it
    plain = DataLoader(dataset, batch_size=3, sampler=sampler, collate_fn=collate_padded)
    for seed in (0, 5):  # two epochs each: the sampler and the bag draws follow torch's RNG
        torch.manual_seed(seed)
        plain_epochs = [list(plain) for _ in range(2)]
        torch.manual_seed(seed)
        device_epochs = [list(on_device) for _ in range(2)]
        for plain_batches, device_batches in zip(plain_epochs, device_epochs):
            _same_batches(plain_batches, device_batches)
    all_slices = BagDataset(rows, small_cache.cache_dir, sampling="all")
    torch.manual_seed(1)
    plain_all = list(DataLoader(all_slices, batch_size=4, shuffle=True, collate_fn=collate_padded))
    torch.manual_seed(1)
    _same_batches(plain_all, DeviceBatchLoader(all_slices, 4, torch.device("cpu")))


def test_volumes_on_the_device_are_the_plain_loaders_batches(small_cache):
    rows = small_cache.index[small_cache.index["fold"] >= 0].reset_index(drop=True)
    dataset = VolumeDataset(rows, small_cache.cache_dir, depth=8, size=(16, 16))
    torch.manual_seed(3)
    plain = list(DataLoader(dataset, batch_size=4, shuffle=True))
    torch.manual_seed(3)
    _same_batches(plain, build_loader(dataset, DataConfig(batch_size=4, train_data_on_device=True), True))


def test_the_device_split_refuses_augmentation(small_cache):
    from losslab.data.transforms import build_transforms

    rows = small_cache.index[small_cache.index["fold"] == 0]
    dataset = VolumeDataset(rows, small_cache.cache_dir, depth=8, transform=build_transforms({"gamma": 0.2}, True))
    with pytest.raises(ValueError, match="data.augment"):
        DeviceBatchLoader(dataset, 4, torch.device("cpu"))


def test_num_workers_auto_follows_the_usable_cores(monkeypatch):
    for cores, expected in ((1, 0), (2, 0), (4, 2), (16, 8), (64, 8)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert resolve_num_workers("auto") == expected
    assert resolve_num_workers(3) == 3
    with pytest.raises(ValueError, match="data.num_workers"):
        resolve_num_workers("many")
    assert DataConfig(num_workers="auto").num_workers == "auto"
    with pytest.raises(ValueError, match="num_workers"):
        DataConfig(num_workers="many")


def test_loader_options_with_workers_and_on_cuda(small_cache):
    rows = small_cache.index[small_cache.index["fold"] == 0]
    dataset = VolumeDataset(rows, small_cache.cache_dir, depth=8)
    with_workers = build_loader(dataset, DataConfig(batch_size=2, num_workers=2), True, device=torch.device("cuda"))
    assert (with_workers.num_workers, with_workers.persistent_workers, with_workers.prefetch_factor,
            with_workers.pin_memory) == (2, True, 4, True)
    in_process = build_loader(dataset, DataConfig(batch_size=2), False, device=torch.device("cpu"))
    assert (in_process.num_workers, in_process.persistent_workers, in_process.pin_memory) == (0, False, False)
    assert [int(i) for b in in_process for i in b["index"]] == list(range(len(rows)))  # evaluation: in order


class _TinyVolumeNet(torch.nn.Module):
    """``(B, C, D, H, W)`` -> ``(logits (B, 2), None)``: a mean over the volume and a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, image):
        return self.linear(image.mean(dim=(2, 3, 4))), None


def test_fit_on_the_device_split_ends_with_the_plain_loaders_weights(small_cache, tmp_path):
    from losslab.config import OptimConfig, TrainConfig
    from losslab.engine.loop import fit
    from losslab.tasks import get_task

    rows = small_cache.index[small_cache.index["fold"] >= 0].reset_index(drop=True)
    train_rows, val_rows = rows[rows["fold"] != 0], rows[rows["fold"] == 0]
    weights = {}
    for on_device in (False, True):
        train_ds = VolumeDataset(train_rows, small_cache.cache_dir, depth=4, size=(8, 8))
        val_ds = VolumeDataset(val_rows, small_cache.cache_dir, depth=4, size=(8, 8))
        data_cfg = DataConfig(batch_size=4, train_data_on_device=on_device)
        torch.manual_seed(0)
        model = _TinyVolumeNet()
        train_cfg = TrainConfig(epochs=2, device="cpu", checkpoint_dir=str(tmp_path / str(on_device)), progress=False)
        fit(model, torch.nn.CrossEntropyLoss(), build_loader(train_ds, data_cfg, True),
            build_loader(val_ds, data_cfg, False), train_cfg, OptimConfig(), ["HGG", "LGG"],
            step=get_task("volume_classification").step(None, torch.nn.CrossEntropyLoss(), ["HGG", "LGG"]))
        weights[on_device] = model.linear.weight.detach().clone()
    torch.testing.assert_close(weights[True], weights[False], rtol=0, atol=0)
    torch.manual_seed(0)
    assert not torch.allclose(weights[True], _TinyVolumeNet().linear.weight)  # it trained from the same start
