"""Augmentation chains from config (losslab.data.transforms)."""

from __future__ import annotations

import numpy as np
import pytest

from losslab.data.transforms import build_transforms


@pytest.fixture()
def stack():
    return np.random.default_rng(0).random((3, 2, 16, 16)).astype(np.float32)


def test_empty_config_and_eval_are_exact_identity(stack):
    for transform in (build_transforms({}, train=True), build_transforms(None, train=True),
                      build_transforms({"rotation": 30, "brightness": 0.2}, train=False)):
        out = transform(stack)
        assert out.dtype == np.float32 and np.array_equal(out, stack)


def test_brightness_shifts_the_mean_by_the_configured_amount(stack):
    transform = build_transforms({"brightness": [0.1, 0.3], "prob": 1.0}, train=True, seed=0)
    shifts = [float(transform(stack).mean() - stack.mean()) for _ in range(200)]
    assert np.mean(shifts) == pytest.approx(0.2, abs=0.01)
    assert 0.1 - 1e-5 <= min(shifts) and max(shifts) <= 0.3 + 1e-5
    symmetric = build_transforms({"brightness": 0.2, "prob": 1.0}, train=True, seed=1)
    assert np.mean([float(symmetric(stack).mean() - stack.mean()) for _ in range(200)]) == pytest.approx(0, abs=0.02)


def test_affine_gamma_keep_shape_and_share_parameters(stack):
    transform = build_transforms({"rotation": 20, "shift": 0.1, "scale": 0.1, "gamma": [0.8, 1.2], "prob": 1.0},
                                 train=True, seed=0)
    same = np.repeat(stack[:1], 3, axis=0)
    out = transform(same)
    assert out.shape == same.shape and out.dtype == np.float32 and not np.allclose(out, same)
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)  # one draw for every instance by default
    per_instance = build_transforms({"rotation": 40, "prob": 1.0, "per_instance": True}, train=True, seed=0)
    varied = per_instance(same)
    assert not np.allclose(varied[0], varied[1])


def test_hflip_off_by_default_and_validation(stack):
    flipped = build_transforms({"hflip": 1.0}, train=True, seed=0)(stack)
    np.testing.assert_array_equal(flipped, stack[..., ::-1])
    with pytest.raises(ValueError, match="unknown key"):
        build_transforms({"rotate": 10}, train=True)
    with pytest.raises(TypeError, match="brightness"):
        build_transforms({"brightness": "high"}, train=True)
