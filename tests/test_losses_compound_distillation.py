"""Compound and distillation losses against hand formulas / numpy references; config files build."""

from __future__ import annotations

import doctest
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from losslab.losses import UnknownLossError, build_loss, list_losses, signed_distance_map
from losslab.losses import compound as compound_module
from losslab.losses import distillation as distillation_module

ATOL = 1e-5
COUNTS = [30, 10, 5]
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "loss"


def test_doctests():
    for module in (compound_module, distillation_module):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0


@pytest.fixture
def cls_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 0, 1])


@pytest.fixture
def seg_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 6, 6, generator=g)
    target = torch.randint(0, 3, (2, 1, 6, 6), generator=g)
    dist = torch.tensor(np.stack([signed_distance_map(t[0].numpy(), 3) for t in target]))
    return logits, target, dist


# ------------------------------------------------------------------------------------- compound
@pytest.mark.parametrize("weighting", ["fixed", "learnable_softmax", "uncertainty"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_compound_one_term_equals_that_term(cls_batch, weighting, reduction):
    z, y = cls_batch
    loss = build_loss("compound", terms=[{"name": "focal", "gamma": 1.5}], weighting=weighting,
                      reduction=reduction, class_counts=COUNTS, num_classes=3)
    expected = build_loss("focal", gamma=1.5, reduction=reduction)(z, y)
    torch.testing.assert_close(loss(z, y), expected, atol=ATOL, rtol=0)
    assert loss.terms() == pytest.approx({"focal": expected.mean().item()}, abs=ATOL)
    assert loss.weights() == pytest.approx({"focal": 1.0})


def test_compound_fixed_weighted_sum_and_str(cls_batch):
    z, y = cls_batch
    loss = build_loss("compound", terms=[{"name": "ce", "weight": 0.25, "class_weights": [1, 2, 4]},
                                         {"name": "focal", "weight": 0.75, "gamma": 2.0},
                                         {"name": "focal", "weight": 0.5, "gamma": 0.5}],
                      class_counts=COUNTS, num_classes=3)
    ce = F.cross_entropy(z, y, weight=torch.tensor([1.0, 2, 4], dtype=torch.float64)).item()
    f2 = build_loss("focal", gamma=2.0)(z, y).item()
    f05 = build_loss("focal", gamma=0.5)(z, y).item()
    assert loss(z, y).item() == pytest.approx(0.25 * ce + 0.75 * f2 + 0.5 * f05, abs=ATOL)
    assert loss.terms() == pytest.approx({"ce": ce, "focal": f2, "focal_2": f05}, abs=ATOL)
    assert loss.weights() == pytest.approx({"ce": 0.25, "focal": 0.75, "focal_2": 0.5})
    assert str(loss) == "0.25·ce + 0.75·focal + 0.5·focal_2"
    assert list(loss.parameters()) == []


def test_compound_seg_example_passes_dist_maps_to_boundary_only(seg_batch):
    logits, target, dist = seg_batch
    spec = yaml.safe_load((CONFIG_DIR / "compound_seg.yaml").read_text())
    name = spec.pop("name")
    loss = build_loss(name, class_counts=COUNTS, num_classes=3, **spec)
    assert loss.family == "segmentation" and loss.weighting == "learnable_softmax"
    dice = build_loss("dice")(logits, target).item()
    focal = build_loss("focal_seg", alpha=0.25, gamma=2)(logits, target).item()
    boundary = build_loss("boundary")(logits, target, dist).item()
    value = loss(logits, target, dist_maps=dist)
    assert value.item() == pytest.approx(0.5 * dice + 0.3 * focal + 0.2 * boundary, abs=ATOL)
    assert loss.terms() == pytest.approx({"dice": dice, "focal_seg": focal, "boundary": boundary}, abs=ATOL)
    assert loss.weights() == pytest.approx({"dice": 0.5, "focal_seg": 0.3, "boundary": 0.2}, abs=1e-6)
    assert str(loss) == "0.5·dice + 0.3·focal_seg + 0.2·boundary"


@pytest.mark.parametrize("weighting", ["learnable_softmax", "uncertainty"])
def test_compound_learnable_weights_move_after_step(cls_batch, weighting):
    z, y = cls_batch
    loss = build_loss("compound", terms=[{"name": "ce", "weight": 0.6}, {"name": "focal", "weight": 0.4}],
                      weighting=weighting, class_counts=COUNTS, num_classes=3)
    params = list(loss.parameters())
    assert len(params) == 1 and params[0].requires_grad
    before = loss.weights()
    assert before == pytest.approx({"ce": 0.6, "focal": 0.4}, abs=1e-6)
    opt = torch.optim.SGD(loss.parameters(), lr=0.5)
    opt.zero_grad()
    loss(z.float(), y).backward()
    assert torch.isfinite(params[0].grad).all()
    opt.step()
    after = loss.weights()
    assert abs(after["ce"] - before["ce"]) > 1e-4
    if weighting == "learnable_softmax":
        assert sum(after.values()) == pytest.approx(1.0, abs=1e-6)


def test_compound_uncertainty_formula(cls_batch):
    z, y = cls_batch
    loss = build_loss("compound", terms=[{"name": "ce", "weight": 2.0}, {"name": "focal", "weight": 0.5}],
                      weighting="uncertainty")
    with torch.no_grad():
        loss.log_vars.copy_(torch.tensor([0.3, -0.2]))
    ce = F.cross_entropy(z, y).item()
    focal = build_loss("focal")(z, y).item()
    expected = np.exp(-0.3) * ce + 0.15 + np.exp(0.2) * focal - 0.1
    assert loss(z, y).item() == pytest.approx(expected, abs=ATOL)
    assert loss.weights() == pytest.approx({"ce": np.exp(-0.3), "focal": np.exp(0.2)}, abs=1e-6)
    assert str(loss).startswith("exp(-s_ce)·ce + exp(-s_focal)·focal + (s_ce + s_focal)/2")


def test_compound_delegates_epoch_and_class_counts(cls_batch):
    z, y = cls_batch
    loss = build_loss("compound", terms=[{"name": "ldam", "max_m": 0.0, "s": 1.0, "drw_start_epoch": 2}],
                      class_counts=COUNTS, num_classes=3)
    loss.on_epoch_start(0)
    torch.testing.assert_close(loss(z, y), F.cross_entropy(z, y))
    loss.on_epoch_start(2)
    assert loss.losses[0].drw_active
    assert loss(z, y).item() != pytest.approx(F.cross_entropy(z, y).item())
    ordinal = build_loss("compound", terms=[{"name": "coral"}, {"name": "corn"}], num_classes=4)
    assert ordinal.output_dim(4) == 3 and ordinal.family == "ordinal"
    torch.testing.assert_close(ordinal.probabilities(torch.zeros(1, 3)), torch.tensor([[0.5, 0.0, 0.0, 0.5]]))


def test_compound_errors():
    with pytest.raises(UnknownLossError, match=r"loss 'compound': terms\[1\]: unknown loss 'dcie'; known losses: "):
        build_loss("compound", terms=[{"name": "dice"}, {"name": "dcie"}])
    with pytest.raises(TypeError, match=r"loss 'compound': terms\[0\] \('focal'\): loss 'focal': unknown parameter"):
        build_loss("compound", terms=[{"name": "focal", "gama": 2}])
    with pytest.raises(ValueError, match=r"terms\[0\] \('focal'\): loss 'focal': gamma=-1.0 is out of range"):
        build_loss("compound", terms=[{"name": "focal", "gamma": -1}])
    with pytest.raises(ValueError, match=r"loss 'compound': terms mix loss families \['classification', 'segmentation'\]"):
        build_loss("compound", terms=[{"name": "ce"}, {"name": "dice"}])
    with pytest.raises(ValueError, match=r"loss 'compound': terms need different head sizes"):
        build_loss("compound", terms=[{"name": "ce"}, {"name": "focal", "mode": "sigmoid"}], num_classes=2)
    with pytest.raises(ValueError, match=r"loss 'compound': weighting='learned' is not allowed"):
        build_loss("compound", terms=[{"name": "ce"}], weighting="learned")
    with pytest.raises(ValueError, match=r"loss 'compound': terms\[0\].weight=0.0 is out of range"):
        build_loss("compound", terms=[{"name": "ce", "weight": 0.0}], weighting="uncertainty")
    with pytest.raises(ValueError, match=r"loss 'compound': terms must not be empty"):
        build_loss("compound", terms=[])
    with pytest.raises(TypeError, match=r"loss 'compound': terms must be a list of dicts"):
        build_loss("compound", terms="ce")
    with pytest.raises(ValueError, match=r"loss 'compound': terms\[0\] \('ldam'\): loss 'ldam': class_counts is required"):
        build_loss("compound", terms=[{"name": "ldam"}])


# --------------------------------------------------------------------------------- distillation
@pytest.fixture
def kd_batch():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(6, 3, generator=g, dtype=torch.float64)
    t = torch.randn(6, 3, generator=g, dtype=torch.float64)
    fs = torch.randn(6, 5, generator=g, dtype=torch.float64)
    ft = torch.randn(6, 7, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 0, 1])
    return s, t, y, fs, ft


def np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def np_kd(s, t, T):
    ls, lt = np_log_softmax(s / T), np_log_softmax(t / T)
    return (np.exp(lt) * (lt - ls)).sum(1) * T**2


def np_ce(s, y):
    return -np_log_softmax(s)[np.arange(len(y)), y]


def reduce_np(values, reduction):
    return {"mean": values.mean(), "sum": values.sum(), "none": values}[reduction]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kd_matches_numpy(kd_batch, reduction):
    s, t, y, _, _ = kd_batch
    loss = build_loss("kd", alpha=0.7, temperature=3.0, reduction=reduction, class_counts=COUNTS, num_classes=3)
    kd, ce = np_kd(s.numpy(), t.numpy(), 3.0), np_ce(s.numpy(), y.numpy())
    np.testing.assert_allclose(loss(s, t, y).numpy(), reduce_np(0.7 * kd + 0.3 * ce, reduction), atol=ATOL)
    assert loss.terms() == pytest.approx({"kd": kd.mean(), "ce": ce.mean()}, abs=ATOL)
    assert loss.family == "distillation"
    ss = s.clone().requires_grad_(True)
    tt = t.clone().requires_grad_(True)
    loss(ss, tt, y).sum().backward()
    assert torch.isfinite(ss.grad).all() and tt.grad is None
    pure = build_loss("kd", alpha=1.0, temperature=2.0)(s, t, None)
    ref = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4
    assert pure.item() == pytest.approx(ref.item(), abs=ATOL)


def test_kd_identical_logits_is_ce(kd_batch):
    s, _, y, _, _ = kd_batch
    loss = build_loss("kd", alpha=0.5)
    assert loss(s, s, y).item() == pytest.approx(0.5 * F.cross_entropy(s, y).item(), abs=ATOL)


def test_combined_matches_formula(kd_batch):
    s, t, y, fs, ft = kd_batch
    loss = build_loss("combined", student_dim=5, teacher_dim=7, alpha=0.6, temperature=2.0, hint_weight=0.5).double()
    W = loss.projection.weight.detach().numpy()
    b = loss.projection.bias.detach().numpy()
    hint = ((fs.numpy() @ W.T + b - ft.numpy()) ** 2).mean(1)
    kd, ce = np_kd(s.numpy(), t.numpy(), 2.0), np_ce(s.numpy(), y.numpy())
    value = loss(s, t, y, student_features=fs, teacher_features=ft)
    assert value.item() == pytest.approx((0.4 * ce + 0.6 * kd + 0.5 * hint).mean(), abs=ATOL)
    assert loss.terms() == pytest.approx({"ce": ce.mean(), "kd": kd.mean(), "hint": hint.mean()}, abs=ATOL)
    value.backward()
    assert loss.projection.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"loss 'combined': student_dim is required"):
        build_loss("combined", teacher_dim=7)


def np_huber(a, b):
    d = np.abs(a - b)
    return np.where(d < 1, 0.5 * d**2, d - 0.5)


def np_rkd(fs, ft):
    def dist(e):
        d = np.sqrt(((e[:, None] - e[None]) ** 2).sum(-1))
        return d / d[d > 0].mean()

    def angle(e):
        diff = e[None, :, :] - e[:, None, :]  # [i, j] = e_j - e_i
        norm = np.linalg.norm(diff, axis=2, keepdims=True)
        diff = diff / np.maximum(norm, 1e-12)
        return np.einsum("ijd,ikd->ijk", diff, diff)

    return np_huber(dist(fs), dist(ft)).mean(1), np_huber(angle(fs), angle(ft)).mean((1, 2))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_rkd_matches_numpy(kd_batch, reduction):
    s, t, y, fs, ft = kd_batch
    loss = build_loss("rkd", reduction=reduction)
    dist, ang = np_rkd(fs.numpy(), ft.numpy())
    ce = np_ce(s.numpy(), y.numpy())
    expected = reduce_np(ce + 25 * dist + 50 * ang, reduction)
    np.testing.assert_allclose(loss(s, t, y, fs, ft).numpy(), expected, atol=1e-4)
    assert loss.terms() == pytest.approx({"ce": ce.mean(), "rkd_distance": dist.mean(), "rkd_angle": ang.mean()},
                                         abs=1e-5)
    f = fs.clone().requires_grad_(True)
    loss(s, t, y, f, ft).sum().backward()
    assert torch.isfinite(f.grad).all()


def test_crd_in_batch_matches_numpy(kd_batch):
    s, t, y, fs, ft = kd_batch
    loss = build_loss("crd", student_dim=5, teacher_dim=7, embed_dim=4, temperature=0.5, ce_weight=0.0,
                      crd_weight=1.0).double()
    es = fs.numpy() @ loss.embed_student.weight.detach().numpy().T + loss.embed_student.bias.detach().numpy()
    et = ft.numpy() @ loss.embed_teacher.weight.detach().numpy().T + loss.embed_teacher.bias.detach().numpy()
    es /= np.linalg.norm(es, axis=1, keepdims=True)
    et /= np.linalg.norm(et, axis=1, keepdims=True)
    logits = es @ et.T / 0.5
    i = np.arange(6)
    expected = -np_log_softmax(logits)[i, i] - np_log_softmax(logits.T)[i, i]
    assert loss(s, t, y, fs, ft).item() == pytest.approx(expected.mean(), abs=ATOL)
    fsg = fs.clone().requires_grad_(True)
    loss(s, t, y, fsg, ft).backward()
    assert torch.isfinite(fsg.grad).all() and loss.embed_teacher.weight.grad is not None


@pytest.mark.parametrize("num_data", [20, 500])  # whole-bank matmul path / gathered-rows path
def test_crd_memory_bank_value_and_update(kd_batch, num_data):
    s, t, y, fs, ft = kd_batch
    loss = build_loss("crd", student_dim=5, teacher_dim=7, embed_dim=4, temperature=0.07, mode="memory_bank",
                      num_data=num_data, num_negatives=5, momentum=0.5, ce_weight=1.0, crd_weight=0.8).double()
    index = torch.tensor([3, 7, 11, 0, 19, 5])
    mem_s = loss.memory_student.clone().numpy()
    mem_t = loss.memory_teacher.clone().numpy()
    with torch.no_grad():
        es, et = (e.numpy() for e in loss.embed(fs, ft))
    torch.manual_seed(123)
    neg = torch.randint(0, num_data, (6, 5)).numpy()
    torch.manual_seed(123)
    fsg = fs.clone().requires_grad_(True)
    value = loss(s, t, y, fsg, ft, index=index)
    value.backward()  # after the in-forward memory update
    assert torch.isfinite(fsg.grad).all() and fsg.grad.abs().sum() > 0

    def nce(anchor, memory):
        cand = np.concatenate([index.numpy()[:, None], neg], axis=1)
        logits = np.einsum("bnd,bd->bn", memory[cand], anchor) / 0.07
        return -np_log_softmax(logits)[:, 0]

    crd = nce(es, mem_t) + nce(et, mem_s)
    expected = (np_ce(s.numpy(), y.numpy()) + 0.8 * crd).mean()
    assert value.item() == pytest.approx(expected, abs=1e-4)
    new_s = 0.5 * mem_s[index.numpy()] + 0.5 * es
    new_s /= np.linalg.norm(new_s, axis=1, keepdims=True)
    np.testing.assert_allclose(loss.memory_student[index].numpy(), new_s, atol=1e-6)
    untouched = [i for i in range(num_data) if i not in index.tolist()]
    np.testing.assert_allclose(loss.memory_teacher[untouched].numpy(), mem_t[untouched])
    loss.eval()
    before = loss.memory_student.clone()
    loss(s, t, y, fs, ft, index=index)
    assert torch.equal(before, loss.memory_student)  # no update in eval mode


def test_crd_errors():
    with pytest.raises(ValueError, match=r"loss 'crd': student_dim is required"):
        build_loss("crd", teacher_dim=8)
    with pytest.raises(ValueError, match=r"loss 'crd': num_data is required for mode='memory_bank'"):
        build_loss("crd", student_dim=8, teacher_dim=8, mode="memory_bank")
    with pytest.raises(ValueError, match=r"loss 'crd': mode='bank' is not allowed; allowed: in_batch, memory_bank"):
        build_loss("crd", student_dim=8, teacher_dim=8, mode="bank")


def np_mmd(x, y, mul=2.0, num=5):
    z = np.concatenate([x, y])
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1)
    n = len(z)
    base = d2.sum() / (n * n - n)
    k = sum(np.exp(-d2 / (base * mul ** (q - num // 2))) for q in range(num))
    b = len(x)
    return k[:b, :b].mean() + k[b:, b:].mean() - 2 * k[:b, b:].mean()


def test_mmd_matches_numpy(kd_batch):
    s, t, y, fs, ft = kd_batch
    ft5 = ft[:, :5] + 1.0
    loss = build_loss("mmd", ce_weight=0.5, mmd_weight=2.0)
    expected = 0.5 * np_ce(s.numpy(), y.numpy()).mean() + 2.0 * np_mmd(fs.numpy(), ft5.numpy())
    assert loss(s, t, y, fs, ft5).item() == pytest.approx(expected, abs=1e-4)
    none = build_loss("mmd", ce_weight=0.0, reduction="none")(s, t, y, fs, ft5)
    assert none.shape == (6,) and none.mean().item() == pytest.approx(np_mmd(fs.numpy(), ft5.numpy()), abs=1e-4)
    projected = build_loss("mmd", student_dim=5, teacher_dim=7).double()
    f = fs.clone().requires_grad_(True)
    projected(s, t, y, f, ft).backward()
    assert torch.isfinite(f.grad).all() and projected.projection.weight.grad.abs().sum() > 0
    assert build_loss("mmd", ce_weight=0.0)(s, t, y, fs, fs).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_compound(kd_batch):
    s, t, y, fs, ft = kd_batch
    loss = build_loss("compound", terms=[{"name": "kd", "weight": 1.0}, {"name": "rkd", "weight": 0.5, "ce_weight": 0.0}])
    value = loss(s, t, y, student_features=fs, teacher_features=ft)
    expected = build_loss("kd")(s, t, y) + 0.5 * build_loss("rkd", ce_weight=0.0)(s, t, y, fs, ft)
    assert value.item() == pytest.approx(expected.item(), abs=ATOL)


# ---------------------------------------------------------------------------------------- configs
def test_every_registered_loss_has_a_config_that_builds():
    files = {p.stem: p for p in CONFIG_DIR.glob("*.yaml")}
    missing = [name for name in list_losses() if name not in files]
    assert not missing, f"no configs/loss/<name>.yaml for {missing}"
    for path in sorted(files.values()):
        spec = yaml.safe_load(path.read_text())
        name = spec.pop("name")
        assert name in list_losses(), path
        loss = build_loss(name, class_counts=[30, 10, 5], num_classes=3, **spec)
        assert loss.family in ("classification", "ordinal", "segmentation", "distillation")
        assert loss.reduction in ("mean", "sum", "none")


def test_every_composite_loss_records_its_terms_through_the_loss_base():
    """compound, dice_boundary, the distillation losses and the multi-task objectives keep their terms
    with ``TermRecorder.record_terms``: ``term_tensors()`` are detached 0-d tensors (the training loop
    sums them on the device), ``terms()`` the same values as floats, and each forward replaces the last."""
    from losslab.losses.base import TermRecorder
    from losslab.losses.multitask import LabelsOnly, MultiTaskDistillation

    torch.manual_seed(0)
    s = {"a": torch.randn(4, 3, requires_grad=True), "b": torch.randn(4, 2)}
    t = {"a": torch.randn(4, 3), "b": torch.randn(4, 2)}
    y = {"a": torch.tensor([0, 1, 2, 0]), "b": torch.tensor([1, 0, 1, 1])}
    fs, ft = torch.randn(4, 8), torch.randn(4, 16)
    objective = MultiTaskDistillation("vanilla", {"temperature": 2.0}, ["a", "b"], 8, 16)
    objective(s, t, y, fs, ft)
    kd_a = F.kl_div(F.log_softmax(s["a"] / 2, 1), F.softmax(t["a"] / 2, 1), reduction="batchmean") * 4
    tensors = objective.term_tensors()
    assert isinstance(objective, TermRecorder) and set(tensors) == {"ce/a", "ce/b", "kd/a", "kd/b"}
    assert all(v.dim() == 0 and not v.requires_grad for v in tensors.values())
    assert float(tensors["ce/a"]) == pytest.approx(float(F.cross_entropy(s["a"], y["a"])), abs=ATOL)
    assert float(tensors["kd/a"]) == pytest.approx(float(kd_a), abs=ATOL)
    assert objective.terms() == {k: float(v) for k, v in tensors.items()}

    labels_only = LabelsOnly(["a", "b"])
    labels_only(s, t, y, fs, ft)
    labels_only.tasks = ["b"]  # the next forward's terms replace the last ones, never add to them
    labels_only(s, t, y, fs, ft)
    assert labels_only.terms() == pytest.approx({"ce/b": float(F.cross_entropy(s["b"], y["b"]))}, abs=ATOL)

    z, target = torch.randn(2, 3, 6, 6, requires_grad=True), torch.randint(0, 3, (2, 1, 6, 6))
    dist = torch.stack([torch.tensor(signed_distance_map(m[0].numpy(), 3)) for m in target])
    dice_boundary = build_loss("dice_boundary")
    dice_boundary(z, target, dist)
    expected = build_loss("dice", reduction="none")(z, target).mean()
    assert all(not v.requires_grad for v in dice_boundary.term_tensors().values())
    assert float(dice_boundary.term_tensors()["dice"]) == pytest.approx(float(expected), abs=ATOL)
