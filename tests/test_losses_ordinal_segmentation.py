"""Ordinal and segmentation losses against numpy reference formulas and MONAI."""

from __future__ import annotations

import doctest
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss as MonaiDiceCE
from monai.losses import DiceLoss as MonaiDice
from monai.losses import FocalLoss as MonaiFocal
from monai.losses import TverskyLoss as MonaiTversky

from losslab.losses import build_loss, signed_distance_map
from losslab.losses import ordinal, segmentation

ATOL = 1e-5


def np_log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def reduce_np(values, reduction):
    return {"mean": values.mean(), "sum": values.sum(), "none": values}[reduction]


def test_doctests():
    for module in (ordinal, segmentation):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0


# -------------------------------------------------------------------------------------- ordinal
@pytest.fixture
def ordinal_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(7, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 3, 1, 0])


def test_coral_hand_value():
    # K = 3, logits 0: each task costs log 2, two tasks
    loss = build_loss("coral", num_classes=3)
    assert loss(torch.zeros(1, 2), torch.tensor([1])).item() == pytest.approx(2 * np.log(2), abs=ATOL)
    assert loss.output_dim(3) == 2 and loss.family == "ordinal"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("importance", [None, [1.0, 0.5, 2.0]])
def test_coral_matches_numpy(ordinal_batch, reduction, importance):
    z, y = ordinal_batch
    loss = build_loss("coral", importance_weights=importance, num_classes=4, reduction=reduction)
    zn, yn = z.numpy(), y.numpy()
    t = (yn[:, None] > np.arange(3)).astype(float)
    ll = np_log_sigmoid(zn) * t + (np_log_sigmoid(zn) - zn) * (1 - t)
    lam = np.ones(3) if importance is None else np.array(importance)
    np.testing.assert_allclose(loss(z, y).numpy(), reduce_np(-(ll * lam).sum(1), reduction), atol=ATOL)
    zz = z.clone().requires_grad_(True)
    loss(zz, y).sum().backward()
    assert torch.isfinite(zz.grad).all()


def test_coral_probabilities_and_predict():
    z = torch.tensor([[2.0, 0.0, -1.0], [-3.0, -4.0, -5.0]], dtype=torch.float64)
    loss = build_loss("coral")
    s = 1 / (1 + np.exp(-z.numpy()))
    expected = np.stack([1 - s[:, 0], s[:, 0] - s[:, 1], s[:, 1] - s[:, 2], s[:, 2]], axis=1)
    np.testing.assert_allclose(loss.probabilities(z).numpy(), expected, atol=ATOL)
    assert loss.predict(z).tolist() == [1, 0]  # z_1 = 0 is not > 0.5 probability
    assert loss.predict(torch.tensor([[2.0, 1.0, 0.5]])).tolist() == [3]


def corn_reference(z, y):
    """Port of coral_pytorch.losses.corn_loss (loop over tasks, subsets, mean over (sample, task) pairs)."""
    losses, num_examples = 0.0, 0
    for k in range(z.shape[1]):
        mask = y > k - 1
        if not mask.any():
            continue
        labels = (y[mask] > k).astype(float)
        pred = z[mask, k]
        ll = np_log_sigmoid(pred) * labels + (np_log_sigmoid(pred) - pred) * (1 - labels)
        losses += -ll.sum()
        num_examples += mask.sum()
    return losses / num_examples


def test_corn_matches_reference(ordinal_batch):
    z, y = ordinal_batch
    loss = build_loss("corn", num_classes=4)
    assert loss(z, y).item() == pytest.approx(corn_reference(z.numpy(), y.numpy()), abs=ATOL)
    # per-sample values: sample with y = 0 only in task 0 (label 0): -log(1 - σ(z_0))
    none = build_loss("corn", reduction="none")(z, y)
    assert none[0].item() == pytest.approx(-(np_log_sigmoid(z[0, 0].item()) - z[0, 0].item()), abs=ATOL)
    assert build_loss("corn", reduction="sum")(z, y).item() == pytest.approx(none.sum().item(), abs=ATOL)
    # a batch of one class
    y0 = torch.full((7,), 2)
    assert loss(z, y0).item() == pytest.approx(corn_reference(z.numpy(), y0.numpy()), abs=ATOL)


def test_corn_probabilities_and_predict(ordinal_batch):
    z, _ = ordinal_batch
    loss = build_loss("corn")
    s = 1 / (1 + np.exp(-z.numpy()))
    cum = np.cumprod(s, axis=1)
    expected = np.concatenate([1 - cum[:, :1], cum[:, :-1] - cum[:, 1:], cum[:, -1:]], axis=1)
    probs = loss.probabilities(z)
    np.testing.assert_allclose(probs.numpy(), expected, atol=ATOL)
    np.testing.assert_allclose(probs.sum(1).numpy(), 1.0, atol=ATOL)
    assert loss.predict(z).tolist() == (cum > 0.5).sum(1).tolist()


def test_coral_bad_importance_weights():
    with pytest.raises(ValueError, match=r"loss 'coral': importance_weights has 2 entries .* num_classes - 1 = 3"):
        build_loss("coral", importance_weights=[1, 1], num_classes=4)


# --------------------------------------------------------------------------------- segmentation
@pytest.fixture
def seg_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 1, 5, 6), generator=g)
    target[1] = torch.where(target[1] == 2, 0, target[1])  # class 2 absent from sample 1
    return logits, target


def np_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_tversky_per_class(logits, target, alpha, beta, include_background=True, smooth=1e-5):
    p = np_softmax(logits.numpy())
    g = np.moveaxis(np.eye(p.shape[1])[target.numpy()[:, 0]], -1, 1)
    axes = tuple(range(2, p.ndim))
    tp = (p * g).sum(axes)
    fp = (p * (1 - g)).sum(axes)
    fn = ((1 - p) * g).sum(axes)
    out = 1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
    return out if include_background else out[:, 1:]


def np_dice_per_class(logits, target, include_background=True, smooth=1e-5):
    p = np_softmax(logits.numpy())
    g = np.moveaxis(np.eye(p.shape[1])[target.numpy()[:, 0]], -1, 1)
    axes = tuple(range(2, p.ndim))
    out = 1 - (2 * (p * g).sum(axes) + smooth) / (p.sum(axes) + g.sum(axes) + smooth)
    return out if include_background else out[:, 1:]


def grad_ok(loss, logits, target, *extra):
    z = logits.clone().requires_grad_(True)
    loss(z, target, *extra).sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("include_background", [True, False])
def test_dice_matches_numpy_and_monai(seg_batch, reduction, include_background):
    logits, target = seg_batch
    loss = build_loss("dice", include_background=include_background, class_counts=[1, 2, 3], num_classes=3,
                      reduction=reduction)
    expected = reduce_np(np_dice_per_class(logits, target, include_background).mean(1), reduction)
    np.testing.assert_allclose(loss(logits, target).numpy(), expected, atol=ATOL)
    if reduction != "none":
        monai = MonaiDice(include_background=include_background, to_onehot_y=True, softmax=True, reduction=reduction)
        m = monai(logits, target).item()
        if reduction == "sum":  # MONAI sums over samples AND classes; ours sums per-sample class means
            m /= 3 if include_background else 2
        assert loss(logits, target).item() == pytest.approx(m, abs=ATOL)
    grad_ok(loss, logits, target)


def test_dice_one_class_batch(seg_batch):
    logits, _ = seg_batch
    target = torch.zeros(2, 1, 5, 6, dtype=torch.long)
    loss = build_loss("dice")
    assert loss(logits, target).item() == pytest.approx(np_dice_per_class(logits, target).mean(), abs=ATOL)
    grad_ok(loss, logits, target)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_tversky_matches_numpy_and_equals_dice(seg_batch, reduction):
    logits, target = seg_batch
    loss = build_loss("tversky", alpha=0.3, beta=0.7, reduction=reduction)
    expected = reduce_np(np_tversky_per_class(logits, target, 0.3, 0.7).mean(1), reduction)
    np.testing.assert_allclose(loss(logits, target).numpy(), expected, atol=ATOL)
    assert loss(logits, target).sum().item() == pytest.approx(
        reduce_np(MonaiTversky(to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7, reduction="none")(
            logits, target).reshape(2, -1).mean(1).numpy(), reduction).sum(), abs=ATOL)
    half = build_loss("tversky", alpha=0.5, beta=0.5, reduction=reduction)
    torch.testing.assert_close(half(logits, target), build_loss("dice", reduction=reduction)(logits, target),
                               atol=ATOL, rtol=0)
    grad_ok(loss, logits, target)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_focal_tversky_matches_numpy(seg_batch, reduction):
    logits, target = seg_batch
    loss = build_loss("focal_tversky", alpha=0.3, beta=0.7, gamma=0.75, reduction=reduction)
    expected = reduce_np((np_tversky_per_class(logits, target, 0.3, 0.7) ** 0.75).mean(1), reduction)
    np.testing.assert_allclose(loss(logits, target).numpy(), expected, atol=ATOL)
    grad_ok(loss, logits, target)
    with pytest.raises(ValueError, match=r"loss 'focal_tversky': gamma=0.0 is out of range"):
        build_loss("focal_tversky", gamma=0.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_focal_seg_matches_monai_and_numpy(seg_batch, reduction):
    logits, target = seg_batch
    loss = build_loss("focal_seg", gamma=2.0, alpha=0.25, reduction=reduction, num_classes=3)
    monai = MonaiFocal(to_onehot_y=True, use_softmax=True, gamma=2.0, alpha=0.25, reduction="none")(logits, target)
    expected = reduce_np(monai.mean(dim=(1, 2, 3)).numpy(), reduction)
    np.testing.assert_allclose(loss(logits, target).numpy(), expected, atol=ATOL)
    if reduction == "mean":
        mean = MonaiFocal(to_onehot_y=True, use_softmax=True, gamma=2.0, alpha=0.25)(logits, target)
        assert loss(logits, target).item() == pytest.approx(mean.item(), abs=ATOL)
        # numpy: -alpha_c (1 - p_c)^gamma g_c log p_c, alpha = 0.75 for background, 0.25 otherwise
        p = np_softmax(logits.numpy())
        g = np.moveaxis(np.eye(3)[target.numpy()[:, 0]], -1, 1)
        a = np.array([0.75, 0.25, 0.25])[None, :, None, None]
        assert loss(logits, target).item() == pytest.approx((-a * (1 - p) ** 2 * g * np.log(p)).mean(), abs=ATOL)
    grad_ok(loss, logits, target)


def test_focal_seg_bad_alpha():
    with pytest.raises(ValueError, match=r"loss 'focal_seg': alpha has 2 entries"):
        build_loss("focal_seg", alpha=[0.5, 0.5], num_classes=3)
    with pytest.raises(ValueError, match=r"loss 'focal_seg': gamma=-1.0 is out of range"):
        build_loss("focal_seg", gamma=-1)


def test_dice_ce_matches_monai(seg_batch):
    logits, target = seg_batch
    loss = build_loss("dice_ce", lambda_dice=0.7, lambda_ce=1.3)
    monai = MonaiDiceCE(to_onehot_y=True, softmax=True, lambda_dice=0.7, lambda_ce=1.3)
    assert loss(logits, target).item() == pytest.approx(monai(logits, target).item(), abs=ATOL)
    grad_ok(loss, logits, target)


def brute_force_sdm(label_map, num_classes, spacing):
    coords = np.array(list(itertools.product(*[range(s) for s in label_map.shape])), dtype=float)
    flat = label_map.reshape(-1)
    out = np.zeros((num_classes, flat.size))
    for c in range(num_classes):
        pos = flat == c
        if not pos.any() or pos.all():
            continue
        d = np.sqrt((((coords[:, None, :] - coords[None, :, :]) * np.asarray(spacing)) ** 2).sum(-1))
        to_in = d[:, pos].min(1)
        to_out = d[:, ~pos].min(1)
        out[c] = np.where(pos, -(to_out - min(spacing)), to_in)
    return out.reshape((num_classes,) + label_map.shape)


def test_signed_distance_map_with_spacing():
    label = np.zeros((6, 7), dtype=np.int64)
    label[1:4, 2:6] = 1
    label[5, 0] = 2
    spacing = (2.0, 0.5)
    sdm = signed_distance_map(label, 4, spacing)  # class 3 absent: zeros
    assert sdm.shape == (4, 6, 7) and sdm.dtype == np.float32
    np.testing.assert_allclose(sdm, brute_force_sdm(label, 4, spacing), atol=1e-5)
    assert (sdm[1][label == 1] <= 0).all() and (sdm[1][label != 1] > 0).all()
    assert not sdm[3].any()
    np.testing.assert_allclose(signed_distance_map(label[None], 4, spacing), sdm)  # channel axis dropped
    np.testing.assert_allclose(signed_distance_map(label, 4), brute_force_sdm(label, 4, (1.0, 1.0)), atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("include_background", [False, True])
def test_boundary_matches_numpy(seg_batch, reduction, include_background):
    logits, target = seg_batch
    dist = torch.tensor(np.stack([signed_distance_map(t[0].numpy(), 3, (1.5, 1.0)) for t in target]))
    loss = build_loss("boundary", include_background=include_background, reduction=reduction)
    p = np_softmax(logits.numpy())
    start = 0 if include_background else 1
    per_sample = (p[:, start:] * dist.numpy()[:, start:]).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(loss(logits, target, dist).numpy(), reduce_np(per_sample, reduction), atol=ATOL)
    grad_ok(loss, logits, target, dist)


def test_dice_boundary_schedule_and_value(seg_batch):
    logits, target = seg_batch
    dist = torch.tensor(np.stack([signed_distance_map(t[0].numpy(), 3) for t in target]))
    loss = build_loss("dice_boundary", alpha_start=1.0, alpha_step=0.3, alpha_min=0.2)
    dice = build_loss("dice")(logits, target).item()
    boundary = build_loss("boundary")(logits, target, dist).item()
    expected_alphas = [1.0, 0.7, 0.4, 0.2, 0.2]
    for epoch, alpha in enumerate(expected_alphas):
        loss.on_epoch_start(epoch)
        assert loss.weights() == pytest.approx({"dice": alpha, "boundary": 1 - alpha})
        assert loss(logits, target, dist).item() == pytest.approx(alpha * dice + (1 - alpha) * boundary, abs=ATOL)
    assert loss.terms() == pytest.approx({"dice": dice, "boundary": boundary}, abs=ATOL)
    with pytest.raises(ValueError, match=r"loss 'dice_boundary': alpha_min=0.9 is out of range"):
        build_loss("dice_boundary", alpha_start=0.5, alpha_min=0.9)


def test_segmentation_3d_shapes_and_task():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 2, 3, 4, 4, generator=g)
    target = torch.randint(0, 2, (2, 1, 3, 4, 4), generator=g)
    for name in ["dice", "dice_ce", "tversky", "focal_tversky", "focal_seg"]:
        loss = build_loss(name, reduction="none")
        assert loss.family == "segmentation"
        out = loss(logits, target)
        assert out.shape == (2,) and torch.isfinite(out).all()
    assert build_loss("dice").predict(logits).shape == (2, 3, 4, 4)
