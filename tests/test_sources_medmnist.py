"""medmnist source: local MedMNIST npz files."""

from __future__ import annotations

import numpy as np
import pytest

from losslab.data.sources import SkipReport, build_source, run_generator


def test_medmnist_grey_generator(tmp_path):
    run_generator("medmnist", str(tmp_path), seed=0)
    report = SkipReport()
    source = build_source("medmnist", str(tmp_path), salt="s", report=report)
    cases = list(source.iter_cases())
    assert report.read == 100 and report.skipped == []
    assert source.class_names == ["class_0", "class_1", "class_2"]
    assert [c.meta["split"] for c in cases].count("val") == 20
    assert cases[0].image.shape == (1, 1, 28, 28) and cases[0].image.dtype == np.float32
    assert 0 <= cases[0].image.min() and cases[0].image.max() <= 1
    with np.load(tmp_path / "synthmnist.npz") as data:
        np.testing.assert_allclose(cases[0].image[0, 0], data["train_images"][0] / 255.0, rtol=1e-6)
        assert cases[0].label == int(data["train_labels"][0, 0])


def test_medmnist_rgb_multilabel_and_3d(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "rgb.npz", train_images=rng.integers(0, 255, (5, 8, 8, 3), dtype=np.uint8),
             train_labels=np.array([[0], [1], [1], [0], [1]]))
    np.savez(tmp_path / "vol.npz", train_images=rng.integers(0, 255, (2, 4, 8, 8), dtype=np.uint8),
             train_labels=np.array([[0], [1]]))
    source = build_source("medmnist", str(tmp_path), salt="s", splits=["train"], files=["rgb.npz"],
                          class_names=["no", "yes"])
    cases = list(source.iter_cases())
    assert cases[0].image.shape == (1, 3, 8, 8) and [c.label for c in cases] == [0, 1, 1, 0, 1]
    volume = list(build_source("medmnist", str(tmp_path), salt="s", splits=["train"], files=["vol.npz"]).iter_cases())
    assert volume[0].image.shape == (4, 1, 8, 8)
    np.savez(tmp_path / "multi.npz", train_images=np.zeros((2, 8, 8), np.uint8), train_labels=np.eye(2, 3))
    with pytest.raises(ValueError, match="label_index"):
        build_source("medmnist", str(tmp_path), salt="s", files=["multi.npz"], splits=["train"])
    multi = build_source("medmnist", str(tmp_path), salt="s", files=["multi.npz"], splits=["train"], label_index=1)
    assert [c.label for c in multi.iter_cases()] == [0, 1]
