"""Classification losses against hand-worked values and independent numpy/torchvision implementations."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from losslab.losses import LossBase, UnknownLossError, build_loss, list_losses, register_loss
from losslab.losses import base as base_module
from losslab.losses import classification
from losslab.losses.classification import NormedLinear, ldam_margins

ATOL = 1e-5
COUNTS = [30, 10, 5]


def np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def reduce_np(values, w_y, reduction):
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    return values.sum() / w_y.sum()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=g, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 2, 0, 1])
    return logits, target


def check_grad(loss, logits, target, **kw):
    z = logits.clone().requires_grad_(True)
    out = loss(z, target, **kw)
    out.sum().backward()
    assert torch.isfinite(z.grad).all()
    return z.grad


# ---------------------------------------------------------------------------------------- registry
def test_registry_lists_and_filters():
    names = list_losses()
    assert names == sorted(names)
    for name in ["ce", "focal", "ldam", "logit_adjusted", "balanced_softmax", "class_balanced"]:
        assert name in names
    assert list_losses("*focal*") == sorted(n for n in names if "focal" in n)
    assert "ce" not in list_losses("*focal*")


def test_unknown_loss_lists_known_names_sorted():
    with pytest.raises(UnknownLossError) as info:
        build_loss("focall")
    msg = str(info.value)
    assert "'focall'" in msg and ", ".join(list_losses()) in msg
    assert isinstance(info.value, KeyError)


def test_unknown_param_names_loss_param_and_accepted():
    with pytest.raises(TypeError, match=r"loss 'focal'.*'gama'.*accepted parameters: gamma, alpha"):
        build_loss("focal", gama=2.0)


def test_none_params_dropped_and_auto_params_dropped_silently():
    loss = build_loss("focal", gamma=None, alpha=None)
    assert loss.gamma == 2.0
    # dice etc. do not take class_counts; build_loss must drop it silently. ce takes both.
    ce = build_loss("ce", class_counts=COUNTS, num_classes=3)
    assert isinstance(ce, LossBase)


def test_register_duplicate_raises():
    with pytest.raises(ValueError, match="already registered"):
        @register_loss("ce")
        class Dup(LossBase):  # noqa: F841
            pass
    assert build_loss("ce").__class__.__name__ == "CrossEntropyLoss"


def test_register_bare_and_key():
    from losslab.losses import registry

    @register_loss
    class _TmpBareLoss(LossBase):
        pass

    @register_loss(key="_tmp_keyed")
    class _TmpKeyed(LossBase):
        pass

    try:
        assert "_TmpBareLoss" in list_losses() and "_tmp_keyed" in list_losses()
        assert _TmpKeyed.name == "_tmp_keyed"
    finally:
        registry._loss_registry.pop("_TmpBareLoss")
        registry._loss_registry.pop("_tmp_keyed")


def test_missing_class_counts_names_loss_and_param():
    for name in ["ldam", "logit_adjusted", "balanced_softmax", "class_balanced"]:
        with pytest.raises(ValueError, match=rf"loss '{name}': class_counts is required"):
            build_loss(name, num_classes=3)
    with pytest.raises(ValueError, match=r"loss 'ce': class_weights='inverse_freq' needs class_counts"):
        build_loss("ce", class_weights="inverse_freq")


def test_bad_values_and_types():
    with pytest.raises(ValueError, match=r"loss 'focal': gamma=-0.5 is out of range"):
        build_loss("focal", gamma=-0.5)
    with pytest.raises(TypeError, match=r"loss 'focal': gamma must be a number, got str"):
        build_loss("focal", gamma="2")
    with pytest.raises(ValueError, match=r"loss 'ce': class_weights has 2 entries .* 3 classes"):
        build_loss("ce", class_weights=[1, 2], num_classes=3)
    with pytest.raises(ValueError, match=r"loss 'focal': class_weights has 4 entries"):
        build_loss("focal", class_weights=[1, 2, 3, 4], class_counts=COUNTS)
    with pytest.raises(ValueError, match=r"loss 'focal': alpha has 2 entries"):
        build_loss("focal", alpha=[0.5, 0.5], num_classes=3)
    with pytest.raises(ValueError, match=r"loss 'ce': class_weights='balanced' is not allowed; allowed: inverse_freq"):
        build_loss("ce", class_weights="balanced", class_counts=COUNTS)
    with pytest.raises(ValueError, match=r"loss 'ce': reduction='avg' is not allowed; allowed: mean, sum, none"):
        build_loss("ce", reduction="avg")
    with pytest.raises(ValueError, match=r"loss 'ldam': class_counts has 3 entries but num_classes=4"):
        build_loss("ldam", class_counts=COUNTS, num_classes=4)
    with pytest.raises(ValueError, match=r"loss 'ldam': s=0.0 is out of range"):
        build_loss("ldam", class_counts=COUNTS, s=0)
    with pytest.raises(ValueError, match=r"loss 'focal': mode='softmx' is not allowed"):
        build_loss("focal", mode="softmx")
    with pytest.raises(ValueError, match=r"loss 'class_balanced': base_loss='bce' is not allowed"):
        build_loss("class_balanced", class_counts=COUNTS, base_loss="bce")


def test_module_doctests():
    for module in (classification, base_module):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0


# ---------------------------------------------------------------------------------------------- ce
def test_ce_hand_value():
    # logits [0, ln 3] for target 1: p = 3/4 -> loss = -log(3/4)
    z = torch.tensor([[0.0, np.log(3.0)]])
    assert build_loss("ce")(z, torch.tensor([1])).item() == pytest.approx(-np.log(0.75), abs=ATOL)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("class_weights", [None, [1, 2, 4], "inverse_freq", "sqrt_inverse_freq", "effective_number"])
def test_ce_matches_numpy(batch, reduction, class_weights):
    logits, target = batch
    loss = build_loss("ce", class_weights=class_weights, class_counts=COUNTS, num_classes=3, beta=0.99,
                      reduction=reduction)
    n = np.array(COUNTS, dtype=np.float64)
    w = {None: np.ones(3), "inverse_freq": 1 / n, "sqrt_inverse_freq": 1 / np.sqrt(n),
         "effective_number": (1 - 0.99) / (1 - 0.99 ** n)}.get(class_weights if isinstance(class_weights, str) or class_weights is None else "x", np.array([1.0, 2, 4]))
    if isinstance(class_weights, str):
        w = w / w.sum() * 3
    y = target.numpy()
    values = -np_log_softmax(logits.numpy())[np.arange(6), y] * w[y]
    expected = reduce_np(values, w[y], reduction)
    np.testing.assert_allclose(loss(logits, target).numpy(), expected, atol=ATOL)
    check_grad(loss, logits, target)


def test_ce_label_smoothing_and_ignore_index(batch):
    logits, target = batch
    target = target.clone()
    target[2] = -1
    loss = build_loss("ce", label_smoothing=0.1, ignore_index=-1)
    lsm = np_log_softmax(logits.numpy())
    keep = [i for i in range(6) if i != 2]
    q = np.full((6, 3), 0.1 / 3)
    q[np.arange(6), np.clip(target.numpy(), 0, 2)] += 0.9
    expected = -(q * lsm).sum(1)[keep].mean()
    assert loss(logits, target).item() == pytest.approx(expected, abs=ATOL)
    none = build_loss("ce", ignore_index=-1, reduction="none")(logits, target)
    assert none[2].item() == 0.0


# ------------------------------------------------------------------------------------------- focal
def np_focal(logits, y, gamma, alpha=None, w=None):
    lsm = np_log_softmax(logits)
    logp = lsm[np.arange(len(y)), y]
    a = np.ones(len(y)) if alpha is None else (np.asarray(alpha)[y] if np.ndim(alpha) else np.full(len(y), alpha))
    wy = np.ones(len(y)) if w is None else np.asarray(w, dtype=np.float64)[y]
    return -a * wy * (1 - np.exp(logp)) ** gamma * logp, wy


def test_focal_hand_value():
    # p_y = 3/4, gamma 2: (1/4)^2 * -log(3/4); alpha 0.25
    z = torch.tensor([[0.0, np.log(3.0)]])
    expected = 0.25 * (0.25 ** 2) * -np.log(0.75)
    assert build_loss("focal", gamma=2.0, alpha=0.25)(z, torch.tensor([1])).item() == pytest.approx(expected, abs=ATOL)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("alpha,class_weights", [(None, None), (0.25, None), ([0.2, 0.3, 0.5], None),
                                                 (None, [1, 2, 4]), ([0.2, 0.3, 0.5], [1, 2, 4])])
def test_focal_softmax_matches_numpy(batch, reduction, alpha, class_weights):
    logits, target = batch
    loss = build_loss("focal", gamma=1.5, alpha=alpha, class_weights=class_weights, num_classes=3,
                      reduction=reduction)
    values, wy = np_focal(logits.numpy(), target.numpy(), 1.5, alpha, class_weights)
    np.testing.assert_allclose(loss(logits, target).numpy(), reduce_np(values, wy, reduction), atol=ATOL)
    check_grad(loss, logits, target)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("class_weights", [None, [1, 2, 4], "effective_number"])
def test_focal_gamma0_equals_ce(batch, reduction, class_weights):
    logits, target = batch
    kw = dict(class_weights=class_weights, class_counts=COUNTS, num_classes=3, reduction=reduction)
    focal = build_loss("focal", gamma=0.0, **kw)(logits, target)
    ce = build_loss("ce", **kw)(logits, target)
    torch.testing.assert_close(focal, ce, atol=ATOL, rtol=0)


def test_focal_edge_cases(batch):
    logits, _ = batch
    one_class = torch.zeros(6, dtype=torch.long)  # a batch of one class, classes 1 and 2 absent
    values, wy = np_focal(logits.numpy(), one_class.numpy(), 2.0, None, [1, 2, 4])
    loss = build_loss("focal", gamma=2.0, class_weights=[1, 2, 4])
    assert loss(logits, one_class).item() == pytest.approx(values.sum() / wy.sum(), abs=ATOL)
    check_grad(loss, logits, one_class)
    ignored = torch.tensor([0, -100, 2, -100, 1, 1])
    keep = np.array([0, 2, 4, 5])
    values, wy = np_focal(logits.numpy()[keep], ignored.numpy()[keep], 2.0)
    assert build_loss("focal")(logits, ignored).item() == pytest.approx(values.mean(), abs=ATOL)
    none = build_loss("focal", reduction="none")(logits, ignored)
    assert none[1].item() == 0.0 and none[3].item() == 0.0
    grad = check_grad(build_loss("focal"), logits, ignored)
    assert grad[1].abs().sum() == 0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("alpha", [0.25, None])
def test_focal_sigmoid_binary_matches_torchvision(reduction, alpha):
    from torchvision.ops import sigmoid_focal_loss as tv_focal

    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 1, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 0, 0, 1, 0])
    loss = build_loss("focal", mode="sigmoid", gamma=2.0, alpha=alpha, reduction=reduction)
    assert loss.output_dim(2) == 1
    expected = tv_focal(z, y.unsqueeze(1).double(), alpha=-1 if alpha is None else alpha, gamma=2.0,
                        reduction=reduction)
    torch.testing.assert_close(loss(z, y), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(loss(z.squeeze(1), y), expected, atol=ATOL, rtol=0)
    check_grad(loss, z, y)
    probs = loss.probabilities(z)
    torch.testing.assert_close(probs[:, 1], torch.sigmoid(z[:, 0]))
    assert torch.equal(loss.predict(z), (z[:, 0] > 0).long())


def test_focal_sigmoid_one_vs_rest_matches_torchvision(batch):
    from torchvision.ops import sigmoid_focal_loss as tv_focal

    logits, target = batch
    loss = build_loss("focal", mode="sigmoid", gamma=2.0, alpha=0.25, reduction="sum")
    expected = tv_focal(logits, F.one_hot(target, 3).double(), alpha=0.25, gamma=2.0, reduction="sum")
    torch.testing.assert_close(loss(logits, target), expected, atol=ATOL, rtol=0)
    per_sample = build_loss("focal", mode="sigmoid", alpha=0.25, reduction="none")(logits, target)
    torch.testing.assert_close(per_sample, tv_focal(logits, F.one_hot(target, 3).double(), 0.25, 2.0).sum(1))


# -------------------------------------------------------------------------------------------- ldam
def test_ldam_margins_and_value(batch):
    logits, target = batch
    n = np.array(COUNTS, dtype=np.float64)
    m = n ** -0.25
    m = m * 0.5 / m.max()
    np.testing.assert_allclose(ldam_margins(COUNTS, 0.5).numpy(), m, atol=1e-6)
    loss = build_loss("ldam", class_counts=COUNTS, num_classes=3, max_m=0.5, s=30.0)
    z = logits.numpy().copy()
    y = target.numpy()
    z[np.arange(6), y] -= m[y]
    expected = -np_log_softmax(30 * z)[np.arange(6), y].mean()
    assert loss(logits, target).item() == pytest.approx(expected, abs=1e-4)
    check_grad(loss, logits, target)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ldam_m0_s1_equals_ce(batch, reduction):
    logits, target = batch
    loss = build_loss("ldam", class_counts=COUNTS, max_m=0.0, s=1.0, reduction=reduction)
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(logits, target, reduction=reduction))
    loss.on_epoch_start(1000)  # DRW on: weighted CE with effective-number weights
    n = torch.tensor(COUNTS, dtype=torch.float64)
    w = (1 - 0.9999) / (1 - 0.9999 ** n)
    w = (w / w.sum() * 3).float().double()
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(logits, target, weight=w, reduction=reduction),
                               atol=1e-6, rtol=1e-6)


def test_ldam_drw_switches_at_its_epoch(batch):
    logits, target = batch
    loss = build_loss("ldam", class_counts=COUNTS, drw_start_epoch=3)
    values = []
    for epoch in range(5):
        loss.on_epoch_start(epoch)
        values.append(loss(logits, target).item())
        assert (loss.class_weights is not None) == (epoch >= 3)
    assert values[0] == values[1] == values[2]
    assert values[3] == values[4] and values[3] != pytest.approx(values[2])
    w = loss.drw_weights
    assert w.sum().item() == pytest.approx(3.0, abs=1e-5) and w[2] > w[1] > w[0]
    no_drw = build_loss("ldam", class_counts=COUNTS, drw=False, drw_start_epoch=0)
    no_drw.on_epoch_start(10)
    assert no_drw.class_weights is None


def test_ldam_probabilities_scaled_softmax_and_normed_linear():
    loss = build_loss("ldam", class_counts=COUNTS)
    assert loss.head == "normed_linear"
    z = torch.tensor([[0.2, -0.1, 0.5]])
    torch.testing.assert_close(loss.probabilities(z), torch.softmax(30.0 * z, 1))
    head = NormedLinear(4, 3)
    x = torch.randn(5, 4)
    out = head(x)
    expected = F.normalize(x, dim=1) @ F.normalize(head.weight, dim=0)
    torch.testing.assert_close(out, expected)
    assert out.abs().max() <= 1 + 1e-6


# ----------------------------------------------------------------------------- logit adjustment
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_logit_adjusted_matches_formula(batch, reduction):
    logits, target = batch
    tau = 1.3
    loss = build_loss("logit_adjusted", class_counts=COUNTS, tau=tau, reduction=reduction)
    pi = np.array(COUNTS) / sum(COUNTS)
    values = -np_log_softmax(logits.numpy() + tau * np.log(pi))[np.arange(6), target.numpy()]
    np.testing.assert_allclose(loss(logits, target).numpy(), reduce_np(values, np.ones(6), reduction), atol=ATOL)
    check_grad(loss, logits, target)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_logit_adjustment_reductions_to_ce(batch, reduction):
    logits, target = batch
    ce = F.cross_entropy(logits, target, reduction=reduction)
    la0 = build_loss("logit_adjusted", class_counts=COUNTS, tau=0.0, reduction=reduction)
    torch.testing.assert_close(la0(logits, target), ce)
    for name in ["logit_adjusted", "balanced_softmax"]:
        balanced = build_loss(name, class_counts=[12, 12, 12], reduction=reduction)
        torch.testing.assert_close(balanced(logits, target), ce, atol=ATOL, rtol=0)
    cb = build_loss("class_balanced", class_counts=[12, 12, 12], base_loss="ce", reduction=reduction)
    torch.testing.assert_close(cb(logits, target), ce, atol=ATOL, rtol=0)


def test_balanced_softmax_formula(batch):
    logits, target = batch
    loss = build_loss("balanced_softmax", class_counts=COUNTS)
    z = logits.numpy()
    n = np.array(COUNTS, dtype=np.float64)
    y = target.numpy()
    p = n * np.exp(z) / (n * np.exp(z)).sum(1, keepdims=True)
    assert loss(logits, target).item() == pytest.approx(-np.log(p[np.arange(6), y]).mean(), abs=ATOL)
    torch.testing.assert_close(loss.probabilities(logits), torch.softmax(logits, 1))


@pytest.mark.parametrize("base_loss,gamma", [("ce", 0.0), ("focal", 2.0)])
def test_class_balanced_matches_numpy(batch, base_loss, gamma):
    logits, target = batch
    beta = 0.99
    loss = build_loss("class_balanced", class_counts=COUNTS, num_classes=3, beta=beta, base_loss=base_loss)
    n = np.array(COUNTS, dtype=np.float64)
    w = (1 - beta) / (1 - beta ** n)
    w = w / w.sum() * 3
    values, wy = np_focal(logits.numpy(), target.numpy(), gamma, None, w)
    assert loss(logits, target).item() == pytest.approx(values.sum() / wy.sum(), abs=ATOL)
    check_grad(loss, logits, target)


def test_base_defaults():
    loss = build_loss("ce")
    z = torch.tensor([[1.0, 2.0, 0.5]])
    assert loss.family == "classification" and loss.output_dim(3) == 3
    assert loss.terms() == {} and loss.weights() == {}
    loss.on_epoch_start(0)
    torch.testing.assert_close(loss.probabilities(z), torch.softmax(z, 1))
    assert loss.predict(z).tolist() == [1]


def test_a_loss_says_its_family_and_the_former_task_name_is_gone():
    """``family`` is the one attribute, on classes and instances, a compound's included; ``task`` no longer
    exists, and a loss class that still sets ``task`` is refused."""
    compound = build_loss("compound", terms=[{"name": "dice"}, {"name": "boundary"}])
    assert compound.family == "segmentation" and not hasattr(compound, "task")
    coral = build_loss("coral")
    assert coral.family == "ordinal" and not hasattr(type(coral), "task")
    from losslab.losses import get_loss_class

    assert get_loss_class("kd").family == "distillation"
    with pytest.raises(TypeError, match="sets task='regression'.*family"):
        class _Stale(LossBase):  # noqa: F841
            task = "regression"
