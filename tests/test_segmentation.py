"""Segmentation experiments end to end: preprocess report, per-loss CLI runs, evaluate, learned compound
weights, the α schedule, Dice/HD95 against independent computations, sigmoid losses against MONAI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
SEG_CONFIGS = ["seg_dice", "seg_dice_ce", "seg_focal", "seg_tversky", "seg_focal_tversky", "seg_boundary",
               "seg_compound", "seg_compound_learnable"]
REGIONS = ["wt", "tc", "et"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP barriers of tiny 2D/3D convolutions
    otherwise spin for most of the run (100x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def seg_root(tmp_path_factory) -> Path:
    """8 embedded BraTS-layout cases of 32 x 32 x 16 voxels with their *_seg masks."""
    from _data_factories import generate_embedded_brats

    return generate_embedded_brats(tmp_path_factory, "segdata", seed=5, num_cases=8, shape=(32, 32, 16))


@pytest.fixture(scope="session")
def seg_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("segcache")


def _overrides(seg_root: Path, cache_dir: Path, ckpt: Path, experiment: str, *extra: str) -> list[str]:
    return [f"data.root={seg_root}", f"data.cache_dir={cache_dir}", "data.num_folds=2", "data.test_fraction=0", "data.salt=test-salt",
            "data.batch_size=2", "seg.patch_size=[16, 16, 16]", "seg.samples_per_case=1", "train.epochs=2",
            f"train.checkpoint_dir={ckpt}", f"tracking.experiment={experiment}",
            "tracking.registered_model_name=test-seg", "optim.lr=0.01", "train.plot_every=1", *extra]


def _cli(*args: str):
    from losslab.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def _train(config: str, seg_root, seg_cache_dir, tmp_path, experiment: str, *extra: str) -> str:
    args = ["train", "-c", str(REPO / "configs" / "experiment" / f"{config}.yaml")]
    for o in _overrides(seg_root, seg_cache_dir, tmp_path / "ckpt", experiment, *extra):
        args += ["-o", o]
    out = _cli(*args)
    line = next(l for l in out.splitlines() if l.startswith("fold 0: FINISHED"))
    return line.split(" run ")[1].split()[0]


def _counted_fractions(cache_dir: Path, fold: int) -> list[float]:
    """Per region, foreground voxels / voxels over the training volumes of ``fold``, counted from the
    cached target arrays (not from the index's counts)."""
    index = pd.read_parquet(cache_dir / "index.parquet").to_dict("records")
    targets = [np.load(cache_dir / r["target_path"]) for r in index
               if r["fold"] >= 0 and r["fold"] != fold]
    fg = np.sum([t.reshape(t.shape[0], -1).sum(axis=1) for t in targets], axis=0)
    return [max(int(c), 1) / sum(t[0].size for t in targets) for c in fg]


def _history(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


# ------------------------------------------------------------------------------------ CLI runs
@pytest.mark.parametrize("config", SEG_CONFIGS)
def test_a_short_run_per_loss_logs_region_dice_each_epoch_and_registers_a_model(config, seg_root, seg_cache_dir,
                                                                                 tmp_path):
    run_id = _train(config, seg_root, seg_cache_dir, tmp_path, "seg-losses")
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["losslab.task"] == "segmentation"
    for key in [f"val/dice_{r}" for r in REGIONS] + ["val/mean_dice", "train/loss", "val/loss"] + \
               [f"val/hd95_{r}" for r in REGIONS]:
        assert len(_history(client, run_id, key)) == 2, key
    dice = np.array([_history(client, run_id, f"val/dice_{r}") for r in REGIONS])
    assert ((dice >= 0) & (dice <= 1)).all()
    # mean Dice is the mean of the region Dice values, every epoch
    np.testing.assert_allclose(_history(client, run_id, "val/mean_dice"), dice.mean(axis=0), rtol=1e-6)
    versions = client.search_model_versions(f"name='test-seg' and run_id='{run_id}'")
    assert len(versions) == 1
    if config == "seg_dice":  # the output bias prior: the regions' voxel fractions of the training volumes
        assert run.data.params["seg.output_bias_prior"] == ",".join(
            f"{r}={f:.5g}" for r, f in zip(REGIONS, _counted_fractions(seg_cache_dir, fold=0)))
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/overlay.png", "plots/overlay_epoch_000.png", "plots/curves.png"} <= plots
    if config == "seg_boundary":  # α = max(0.01, 1 − 0.02·epoch) moved from Dice to the boundary term
        np.testing.assert_allclose(_history(client, run_id, "loss_weight/dice"), [1.0, 0.98])
        np.testing.assert_allclose(_history(client, run_id, "loss_weight/boundary"), [0.0, 0.02], atol=1e-12)


def test_evaluate_reproduces_the_best_validation_dice(seg_root, seg_cache_dir, tmp_path, monkeypatch):
    run_id = _train("seg_dice", seg_root, seg_cache_dir, tmp_path, "seg-evaluate", "tracking.alias=candidate")
    client = MlflowClient()
    best = client.get_run(run_id).data.metrics
    version = client.search_model_versions(f"name='test-seg' and run_id='{run_id}'")[0].version
    monkeypatch.setenv("LOSSLAB_SALT", "test-salt")  # the logged config holds only the salt's fingerprint
    out = _cli("evaluate", "-c", str(REPO / "configs" / "experiment" / "seg_dice.yaml"),
               "-m", f"models:/test-seg/{version}", "--split", "val")
    eval_run = out.split("evaluate run ")[1].split(":")[0]
    got = client.get_run(eval_run).data.metrics
    for key in ["mean_dice"] + [f"dice_{r}" for r in REGIONS]:
        assert abs(got[f"val/{key}"] - best[f"best_val/{key}"]) <= 1e-5, key
    # and the best epoch's logged value is that same number
    history = _history(client, run_id, "val/mean_dice")
    assert abs(max(history) - got["val/mean_dice"]) <= 1e-5
    # the run has no held-out test patients (data.test_fraction=0): the default split is refused in one
    # line, and a fold the model trained on cannot be scored
    from losslab.cli import app

    for extra, message in (([], "evaluate.split=test: the cache"),
                           (["--split", "val", "--fold", "1"], "evaluate.fold=1: the model trained on fold 1")):
        result = CliRunner().invoke(app, ["evaluate", "-c", str(REPO / "configs" / "experiment" / "seg_dice.yaml"),
                                          "-m", f"models:/test-seg/{version}", *extra])
        assert result.exit_code != 0 and message in result.output + str(result.exception), result.output


def test_held_out_test_patients_are_scored_once_and_evaluate_reproduces_them(seg_root, tmp_path, monkeypatch):
    """data.test_fraction holds patients out: train scores its best model on them (test/*), equal to a
    direct sliding_window_inference + DiceMetric over the same volumes, and evaluate --split test gives
    the same numbers."""
    from monai.data import DataLoader
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric

    from losslab.config import load_config
    from losslab.data.cache import SegmentationEncoder, build_cache
    from losslab.data.datasets import SegVolumeDataset
    from losslab.engine.checkpoint import load_checkpoint
    from losslab.tasks import build_task_model

    run_id = _train("seg_dice", seg_root, tmp_path / "cache", tmp_path, "seg-test-split", "data.test_fraction=0.25",
                    "tracking.alias=candidate")
    client = MlflowClient()
    metrics = client.get_run(run_id).data.metrics
    cfg = load_config(REPO / "configs" / "experiment" / "seg_dice.yaml",
                      _overrides(seg_root, tmp_path / "cache", tmp_path / "ckpt", "seg-test-split", "data.test_fraction=0.25"))
    info = build_cache(cfg.data, encoder=SegmentationEncoder.from_config(cfg.seg))
    rows = [r for r in info.index if r["fold"] == -1]
    assert metrics["test/n_cases"] == len(rows) == 2  # 25 % of 8 patients
    _, model = build_task_model(cfg, info.channel_names)
    best = client.download_artifacts(run_id, "checkpoints/best.pt", str(tmp_path))
    model.load_state_dict(load_checkpoint(best)["model"])
    model.eval()
    dice = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=True)
    with torch.no_grad():
        for batch in DataLoader(SegVolumeDataset(info, rows), batch_size=1):
            logits = sliding_window_inference(batch["image"], cfg.seg.patch_size, cfg.seg.sw_batch_size, model,
                                              overlap=cfg.seg.overlap)
            dice((torch.sigmoid(logits) > 0.5).float(), batch["label"])
    per_region = dice.aggregate().numpy()
    for r, value in zip(REGIONS, per_region):
        if np.isfinite(value):
            assert metrics[f"test/dice_{r}"] == pytest.approx(float(value), abs=1e-6), r
    monkeypatch.setenv("LOSSLAB_SALT", "test-salt")
    version = client.search_model_versions(f"name='test-seg' and run_id='{run_id}'")[0].version
    out = _cli("evaluate", "-c", str(REPO / "configs" / "experiment" / "seg_dice.yaml"), "-m", f"models:/test-seg/{version}")
    got = client.get_run(out.split("evaluate run ")[1].split(":")[0]).data
    assert got.tags["losslab.eval_split"] == "test"
    assert got.metrics["test/mean_dice"] == pytest.approx(metrics["test/mean_dice"], abs=1e-5)


def test_learned_compound_weights_change_and_are_logged_each_epoch(seg_root, seg_cache_dir, tmp_path):
    from losslab.engine.checkpoint import load_checkpoint

    run_id = _train("seg_compound_learnable", seg_root, seg_cache_dir, tmp_path, "seg-compound", "optim.lr=0.05")
    client = MlflowClient()
    weights = {t: _history(client, run_id, f"loss_weight/{t}") for t in ("dice", "focal_seg", "boundary")}
    assert all(len(v) == 2 for v in weights.values())
    start = np.array([0.5, 0.3, 0.2])
    epoch1 = np.array([weights[t][1] for t in ("dice", "focal_seg", "boundary")])
    assert np.abs(epoch1 - start).max() > 1e-4  # they moved
    np.testing.assert_allclose(epoch1.sum(), 1.0, rtol=1e-6)
    # the last logged weights are softmax(θ) of the checkpointed weight logits
    last = load_checkpoint(client.download_artifacts(run_id, "checkpoints/last.pt", str(tmp_path)))
    theta = last["loss"]["weight_logits"].numpy().astype(float)
    np.testing.assert_allclose(epoch1, np.exp(theta) / np.exp(theta).sum(), rtol=1e-5)


def test_two_dimensional_unet_with_cv_folds(seg_root, seg_cache_dir, tmp_path):
    args = ["train", "-c", str(REPO / "configs" / "experiment" / "seg_dice_ce.yaml")]
    for o in _overrides(seg_root, seg_cache_dir, tmp_path / "ckpt", "seg-2d-cv", "model.spatial_dims=2",
                        "seg.patch_size=[16, 16]", "cv.folds=2", "train.epochs=1", "seg.labels=classes"):
        args += ["-o", o]
    out = _cli(*args)
    assert out.count("FINISHED") == 2
    client = MlflowClient()
    run_id = next(l for l in out.splitlines() if l.startswith("fold 1: FINISHED")).split(" run ")[1].split()[0]
    classes = ["necrotic_core", "edema", "enhancing"]
    for c in classes:
        assert len(_history(client, run_id, f"val/dice_{c}")) == 1


# ------------------------------------------------------------------------------------ preprocess
def test_bad_masks_are_named_in_the_preprocess_report_and_nothing_else_is_lost(seg_root, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(seg_root, root)
    cases = sorted(p for p in root.glob("*/*") if p.is_dir())
    bad_label, bad_shape, empty = cases[0], cases[1], cases[2]

    def rewrite(folder: Path, fn) -> None:
        path = folder / f"{folder.name}_seg.nii.gz"
        img = nib.load(str(path))
        nib.save(nib.Nifti1Image(fn(np.asarray(img.dataobj)), img.affine, img.header), str(path))

    rewrite(bad_label, lambda m: np.where(m == 2, 3, m).astype(np.int16))
    rewrite(bad_shape, lambda m: m[:, :, :-2].copy())
    rewrite(empty, lambda m: np.zeros_like(m))
    cache = tmp_path / "cache"
    args = ["preprocess", "-c", str(REPO / "configs" / "experiment" / "seg_dice.yaml")]
    for o in _overrides(root, cache, tmp_path / "ckpt", "seg-preprocess"):
        args += ["-o", o]
    out = _cli(*args)
    report = json.loads((cache / "report.json").read_text())
    skipped = {s["item"]: s["reason"] for s in report["skipped"]}
    rel = lambda p: str(p.relative_to(root))  # noqa: E731
    assert set(skipped) == {rel(bad_label), rel(bad_shape)}
    assert "[3]" in skipped[rel(bad_label)] and "not in the mapping" in skipped[rel(bad_label)]
    assert "differs from the image" in skipped[rel(bad_shape)]
    assert any(rel(empty) in n and "empty mask" in n for n in report["notes"])
    assert rel(bad_label) in out and rel(bad_shape) in out and rel(empty) in out
    assert report["read"] == len(cases) - 2
    index = pd.read_parquet(cache / "index.parquet").to_dict("records")
    assert len(index) == len(cases) - 2 and sum(r["empty"] for r in index) == 1


def test_distance_maps_are_cached_with_the_voxel_spacing(tmp_path):
    """The msd source (spacing 1 × 1 × 2.5 mm): cached maps equal a brute-force signed distance."""
    from losslab.config import DataConfig, SegConfig
    from losslab.data.cache import SegmentationEncoder, build_cache

    root = tmp_path / "msd"
    from losslab.data.sources import run_generator

    run_generator("msd", str(root), seed=1, cases=4, size=12, depth=6, channels=2, positive_fraction=0.5)
    info = build_cache(DataConfig(source="msd", root=str(root), cache_dir=str(tmp_path / "c"), num_folds=2,
                                  salt="s", generate=None), encoder=SegmentationEncoder.from_config(SegConfig()))
    assert info.channel_names == ["lesion"]
    row = next(r for r in info.index if not r["empty"])
    assert row["spacing"] == [1.0, 1.0, 2.5]
    arrays = info.arrays(row)
    mask = arrays["label"][0].astype(bool)
    grid = np.stack(np.meshgrid(*[np.arange(s) * sp for s, sp in zip(mask.shape, row["spacing"])], indexing="ij"), -1)
    inside, outside = grid[mask], grid[~mask]
    d_out = np.sqrt(((outside[:, None] - inside[None]) ** 2).sum(-1)).min(1)  # to the nearest inside voxel
    d_in = np.sqrt(((inside[:, None] - outside[None]) ** 2).sum(-1)).min(1)
    expected = np.zeros(mask.shape)
    expected[~mask] = d_out
    expected[mask] = -(d_in - 1.0)  # h = min(spacing)
    np.testing.assert_allclose(arrays["dist"][0], expected, atol=1e-5)


# ------------------------------------------------------------------------------------ metrics
class _Fixed(torch.nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits.repeat(x.shape[0], *([1] * (self.logits.dim() - 1)))


def _edges(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    return mask & ~binary_erosion(mask)


def _hd95(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    from scipy.ndimage import distance_transform_edt

    a, b = _edges(pred), _edges(truth)
    d_ab = distance_transform_edt(~b, sampling=spacing)[a]
    d_ba = distance_transform_edt(~a, sampling=spacing)[b]
    return max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))


def test_validation_dice_and_hd95_match_independent_computations():
    from losslab.tasks.segmentation import SegmentationStep
    from losslab.losses import build_loss

    rng = np.random.default_rng(0)
    shape = (16, 16, 8)
    truth = np.zeros((2, *shape), dtype=np.uint8)
    truth[0, 3:10, 4:12, 2:6] = 1
    truth[1, 5:8, 5:9, 3:5] = 1
    logits = torch.tensor(rng.normal(0, 1, (1, 2, *shape)), dtype=torch.float32)
    logits[0, 0, 2:11, 4:11, 2:7] += 3.0
    spacing = [1.0, 1.5, 2.0]
    batch = {"image": torch.zeros(1, 1, *shape), "label": torch.tensor(truth[None]), "dist": torch.zeros(1, 2, *shape),
             "spacing": torch.tensor([spacing], dtype=torch.float64)}
    task = SegmentationStep(build_loss("dice", sigmoid=True), ["a", "b"], True, list(shape), hd95=True)
    metrics, _ = task.validate(_Fixed(logits), [batch], torch.device("cpu"))
    pred = (torch.sigmoid(logits)[0] > 0.5).numpy()
    for r, name in enumerate("ab"):
        p, g = pred[r], truth[r].astype(bool)
        dice = 2 * (p & g).sum() / (p.sum() + g.sum())
        assert metrics[f"val/dice_{name}"] == pytest.approx(dice, abs=1e-6)
        assert metrics[f"val/hd95_{name}"] == pytest.approx(_hd95(p, g, spacing), rel=1e-4)
    assert metrics["val/mean_dice"] == pytest.approx((metrics["val/dice_a"] + metrics["val/dice_b"]) / 2)


# ------------------------------------------------------------------------------------ losses, models
def test_sigmoid_region_losses_match_monai():
    from monai.losses import DiceLoss, FocalLoss, TverskyLoss

    from losslab.losses import build_loss

    z = torch.randn(2, 3, 6, 6, 4)
    y = (torch.rand(2, 3, 6, 6, 4) > 0.6).float()
    assert torch.allclose(build_loss("dice", sigmoid=True)(z, y), DiceLoss(sigmoid=True)(z, y), atol=1e-6)
    assert torch.allclose(build_loss("tversky", alpha=0.3, beta=0.7, sigmoid=True)(z, y),
                          TverskyLoss(sigmoid=True, alpha=0.3, beta=0.7)(z, y), atol=1e-6)
    assert torch.allclose(build_loss("focal_seg", gamma=2.0, alpha=0.25, sigmoid=True)(z, y),
                          FocalLoss(gamma=2.0, alpha=0.25, use_softmax=False)(z, y), atol=1e-6)
    # MONAI's DiceCELoss uses softmax CE for several channels even with sigmoid=True; regions overlap, so BCE
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y)
    assert torch.allclose(build_loss("dice_ce", sigmoid=True)(z, y), DiceLoss(sigmoid=True)(z, y) + bce, atol=1e-6)
    phi = torch.randn(2, 3, 6, 6, 4)
    expected = (torch.sigmoid(z) * phi).mean()
    assert torch.allclose(build_loss("boundary", sigmoid=True)(z, y, phi), expected, atol=1e-6)


@pytest.mark.parametrize("alpha", [None, 0.25, 0.9])
@pytest.mark.parametrize("gamma", [0.0, 1.5, 2.0])
def test_sigmoid_focal_fast_path_matches_monai_values_and_gradients(alpha, gamma):
    """The hand-written sigmoid focal loss (fewer passes, in place without autograd) against MONAI's
    ``sigmoid_focal_loss``: per-sample values, the three reductions, gradients, soft targets and logits
    large enough to saturate the sigmoid, with and without autograd."""
    from monai.losses import FocalLoss

    from losslab.losses import build_loss

    gen = torch.Generator().manual_seed(int(10 * gamma) + (0 if alpha is None else int(100 * alpha)))
    z = torch.randn(3, 3, 6, 5, 4, generator=gen) * 8  # |z| up to ~30: saturated sigmoids on both sides
    targets = {"binary": (torch.rand(3, 3, 6, 5, 4, generator=gen) > 0.7).float(),
               "soft": torch.rand(3, 3, 6, 5, 4, generator=gen)}
    monai = FocalLoss(gamma=gamma, alpha=alpha, use_softmax=False, reduction="none")
    for kind, y in targets.items():
        expected = monai(z, y).reshape(3, -1).mean(dim=1)
        for reduction, reduce in (("none", lambda v: v), ("mean", torch.mean), ("sum", torch.sum)):
            ours = build_loss("focal_seg", gamma=gamma, alpha=alpha, sigmoid=True, reduction=reduction)
            with torch.inference_mode():
                torch.testing.assert_close(ours(z, y), reduce(expected), rtol=1e-5, atol=1e-6, msg=kind)
            torch.testing.assert_close(ours(z, y), reduce(expected), rtol=1e-5, atol=1e-6, msg=kind)
        ours_z, ref_z = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
        build_loss("focal_seg", gamma=gamma, alpha=alpha, sigmoid=True)(ours_z, y).backward()
        monai(ref_z, y).mean().backward()
        torch.testing.assert_close(ours_z.grad, ref_z.grad, rtol=1e-4, atol=1e-8, msg=kind)
    # per-class alpha or class weights: MONAI itself computes the loss
    weighted = build_loss("focal_seg", gamma=gamma, class_weights=[1.0, 2.0, 0.5], sigmoid=True, num_classes=3)
    reference = FocalLoss(gamma=gamma, weight=[1.0, 2.0, 0.5], use_softmax=False)(z, targets["binary"])
    torch.testing.assert_close(weighted(z, targets["binary"]), reference, rtol=1e-5, atol=1e-6)


def test_sigmoid_boundary_matches_its_formula_per_sample():
    from losslab.losses import build_loss

    gen = torch.Generator().manual_seed(3)
    z, phi = torch.randn(4, 3, 6, 5, 4, generator=gen) * 5, torch.randn(4, 3, 6, 5, 4, generator=gen) * 3
    expected = (torch.sigmoid(z) * phi).reshape(4, -1).mean(dim=1)
    torch.testing.assert_close(build_loss("boundary", sigmoid=True, reduction="none")(z, None, phi), expected)
    with pytest.raises(ValueError, match=r"target shape \(1, 3, 6, 5, 4\) differs from the logits' \(4, 3"):
        build_loss("focal_seg", sigmoid=True)(z, phi[:1])


@pytest.mark.parametrize("backbone", ["unet", "segresnet", "swinunetr"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_output_bias_is_the_last_layer_and_starts_at_the_prior(backbone, spatial_dims):
    """Moving the bias :meth:`SegmentationNet.output_bias` finds by δ_c moves every logit of channel c by
    δ_c (so it is the network's last, additive layer); ``init_output_bias`` sets it to the log-odds of
    the fractions (regions) or their log (classes)."""
    import math

    from losslab.config import ModelConfig
    from losslab.models import build_model

    cfg = ModelConfig(kind="segmentation", backbone=backbone, spatial_dims=spatial_dims, in_chans=2)
    model = build_model(cfg, num_outputs=3).eval()
    shape = [64, 64, 32][:spatial_dims]  # SwinUNETR needs more than one voxel at its bottleneck
    x = torch.randn(1, 2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
        delta = torch.tensor([0.5, -1.0, 2.0])
        model.output_bias().add_(delta)
        shift = model(x) - before
    expected = delta.view(1, 3, *([1] * spatial_dims)).expand_as(shift)
    torch.testing.assert_close(shift, expected, atol=2e-5, rtol=0)
    fractions = [0.02, 0.005, 0.001]
    model.init_output_bias(fractions, sigmoid=True)
    torch.testing.assert_close(model.output_bias().detach(), torch.tensor([math.log(f / (1 - f)) for f in fractions]))
    model.init_output_bias([0.9, 0.06, 0.04], sigmoid=False)
    torch.testing.assert_close(model.output_bias().detach(), torch.tensor([math.log(0.9), math.log(0.06), math.log(0.04)]))
    with pytest.raises(ValueError, match=r"3 fraction\(s\) in \(0, 1\) needed for 3 output channel\(s\), got \[0.5, 0.0, 0.1\]"):
        model.init_output_bias([0.5, 0.0, 0.1], sigmoid=True)


def test_voxel_fractions_count_the_training_volumes_for_regions_and_classes(seg_root, tmp_path):
    from losslab.config import load_config
    from losslab.data.cache import SegmentationEncoder, build_cache

    for labels in ("regions", "classes"):
        cache = tmp_path / labels
        cfg = load_config(REPO / "configs" / "experiment" / "seg_dice.yaml",
                          _overrides(seg_root, cache, tmp_path / "ckpt", "unused", f"seg.labels={labels}"))
        info = build_cache(cfg.data, encoder=SegmentationEncoder.from_config(cfg.seg))
        index = pd.read_parquet(cache / "index.parquet").to_dict("records")
        for fold in (0, 1):
            targets = [np.load(cache / r["target_path"]) for r in index
                       if r["fold"] >= 0 and r["fold"] != fold]
            size = sum(t[0].size for t in targets)
            if labels == "regions":
                counts = np.sum([t.reshape(3, -1).sum(axis=1) for t in targets], axis=0)
            else:
                counts = np.sum([[int((t == k).sum()) for k in range(4)] for t in targets], axis=0)
            expected = [max(int(c), 1) / size for c in counts]
            assert info.voxel_fractions(fold) == pytest.approx(expected, rel=1e-12), (labels, fold)
        if labels == "classes":
            assert sum(info.voxel_fractions(0)) == pytest.approx(1.0)


@pytest.mark.parametrize("backbone", ["unet", "segresnet", "swinunetr"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_segmentation_models_in_2d_and_3d(backbone, spatial_dims):
    from losslab.config import ModelConfig
    from losslab.models import build_model

    cfg = ModelConfig(kind="segmentation", backbone=backbone, spatial_dims=spatial_dims, in_chans=4)
    model = build_model(cfg, num_outputs=3).eval()
    side = 64 if backbone == "swinunetr" else 32  # SwinUNETR: more than one voxel at its 1/32 bottleneck
    x = torch.randn(1, 4, *([side] * spatial_dims))
    with torch.no_grad():
        assert model(x).shape == (1, 3, *([side] * spatial_dims))


def test_segmentation_refusals_name_the_key():
    from losslab.config import ConfigError, ModelConfig, load_config
    from losslab.models import build_model
    from losslab.tasks import build_task_model

    with pytest.raises(KeyError, match="known: segresnet, swinunetr, unet"):
        build_model(ModelConfig(kind="segmentation", backbone="vnet"), num_outputs=2)
    with pytest.raises(TypeError, match="nope"):
        build_model(ModelConfig(kind="segmentation", backbone="unet", backbone_kwargs={"nope": 1}), num_outputs=2)
    with pytest.raises(ConfigError, match="seg.patch_size"):
        load_config(REPO / "configs" / "experiment" / "seg_dice.yaml", ["model.spatial_dims=2"])
    with pytest.raises(ConfigError, match="loss.name='focal' .* is a classification loss; task 'segmentation'"):
        load_config(REPO / "configs" / "experiment" / "seg_dice.yaml", ["loss=focal"])
    cfg = load_config(REPO / "configs" / "experiment" / "seg_dice.yaml")  # past the loader, the builder refuses too
    with pytest.raises(ValueError, match="loss.name='focal' is not a segmentation loss"):
        build_task_model(cfg.model_copy(update={"loss": cfg.loss.model_validate({"name": "focal"})}), REGIONS)
    with pytest.raises(ConfigError, match=r"train.mixup_alpha=0.4 \(in .*\): mixup of whole volumes .* set it to 0"):
        load_config(REPO / "configs" / "experiment" / "seg_dice.yaml", ["train.mixup_alpha=0.4"])


def test_sweep_over_segmentation_knobs_then_compare_ranks_by_mean_dice(seg_root, seg_cache_dir, tmp_path):
    import mlflow
    import optuna

    from losslab.config import load_config
    from losslab.pipelines.compare import run_compare
    from losslab.pipelines.sweep import run_sweep, sweep_settings

    space = ("{loss: {type: categorical, choices: [tversky, compound_seg]}, "
             "loss.alpha: {type: float, low: 0.2, high: 0.8, when: {loss: tversky}}, "
             "loss.terms.2.weight: {type: float, low: 0.1, high: 0.9, when: {loss: compound_seg}}}")
    cfg = load_config(REPO / "configs" / "experiment" / "seg_dice.yaml", _overrides(
        seg_root, seg_cache_dir, tmp_path / "ckpt", "seg-sweep", "train.epochs=1",
        f"sweep={{storage: 'sqlite:///{tmp_path / 'optuna.db'}', n_trials: 3, space: {space}, "
        "sampler: {name: random, seed: 1}, pruner: {name: none}}"))
    result = run_sweep(cfg, sweep_settings(cfg))
    study = optuna.load_study(study_name=result.study_name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    client = MlflowClient()
    folds = client.search_runs([mlflow.get_experiment_by_name("seg-sweep").experiment_id],
                               "tags.`losslab.sweep_role` = 'fold'")
    for t in study.trials:  # the objective is the fold run's best mean Dice, with the sampled knobs applied
        (run,) = [r for r in folds if r.data.tags.get("mlflow.parentRunId") == t.user_attrs["mlflow_run_id"]]
        assert run.data.metrics["best_val/mean_dice"] == pytest.approx(t.value)
        if t.params["loss"] == "tversky":
            assert run.data.params["loss.alpha"] == str(t.params["loss.alpha"])
        else:
            terms = run.data.params["loss.terms"]
            assert f'"weight": {t.params["loss.terms.2.weight"]}' in terms, terms
    table = run_compare("seg-sweep", metrics=["mean_dice", "dice_wt", "dice_tc", "dice_et", "hd95_wt"], log_run=False)
    by_id = {r.info.run_id: r for r in folds}
    pooled = table.runs  # like with like: the runs compare pooled (same config apart from the grouping key)
    assert set(pooled["run_id"]) <= set(by_id) and len(pooled) >= 2
    means = {}
    for loss, members in pooled.groupby("losslab.loss"):
        means[loss] = float(np.mean([by_id[i].data.metrics["best_val/mean_dice"] for i in members["run_id"]]))
        assert table.table.loc[loss, "mean_dice_mean"] == pytest.approx(means[loss])
        wt = np.mean([by_id[i].data.metrics["best_val/dice_wt"] for i in members["run_id"]])
        assert table.table.loc[loss, "dice_wt_mean"] == pytest.approx(wt)
    ranked = [g for g in table.table.index if g in means]
    assert ranked == sorted(means, key=lambda k: -means[k])
    assert {"dice_tc_mean", "dice_et_mean", "hd95_wt_mean"} <= set(table.table.columns)


class _Interrupt(RuntimeError):
    pass


def test_a_killed_segmentation_run_resumes_and_ends_like_the_uninterrupted_one(seg_root, seg_cache_dir, tmp_path):
    """Segmentation trains through the engine's fit: `train --resume` continues a run stopped at epoch 1
    from its last checkpoint and ends with the uninterrupted run's metrics (the crops, flips and
    shuffle are reseeded per epoch, so the resumed epochs draw the same patches)."""
    from losslab.config import load_config
    from losslab.engine.callbacks import Callback
    from losslab.pipelines.train import run_train

    class StopAt(Callback):
        def on_epoch_start(self, state):
            if state.epoch == 1:
                raise _Interrupt("stopped at epoch 1")

    def config(experiment):
        return load_config(REPO / "configs" / "experiment" / "seg_compound_learnable.yaml",
                           _overrides(seg_root, seg_cache_dir, tmp_path / "ckpt", experiment, "train.epochs=3",
                                      "tracking.log_model=false"))

    reference = run_train(config("seg-resume-ref")).folds[0]
    with pytest.raises(_Interrupt):
        run_train(config("seg-resume"), extra_callbacks=[StopAt()])
    client = MlflowClient()
    (cut,) = client.search_runs([client.get_experiment_by_name("seg-resume").experiment_id])
    assert cut.info.status == "FAILED"
    resumed = run_train(config("seg-resume"), resume_run_id=cut.info.run_id).folds[0]
    assert resumed.run_id == cut.info.run_id and client.get_run(cut.info.run_id).info.status == "FINISHED"
    for key in ["val/mean_dice", "val/loss", "train/loss", "loss_weight/dice"] + [f"val/dice_{r}" for r in REGIONS]:
        got, want = _history(client, resumed.run_id, key), _history(client, reference.run_id, key)
        assert len(got) == 3 and got == pytest.approx(want, abs=1e-6, nan_ok=True), key


def test_cached_volumes_are_z_scored_per_channel_over_the_brain():
    """The segmentation cache's normalisation against a hand computation: per channel, mean and
    population std of the non-zero voxels; the background stays 0; a constant channel becomes 0."""
    from losslab.data.cache.segmentation import _zscore

    rng = np.random.default_rng(1)
    image = rng.normal(100, 30, (3, 12, 12, 6)).astype(np.float32)
    image[image < 90] = 0
    image[2][image[2] > 0] = 5.0  # constant brain: std 0
    before = image.copy()  # the hand computation reads this copy, made before the code runs
    got = _zscore(image)
    np.testing.assert_array_equal(image, before)  # the caller's image is left as it was
    for c in range(3):
        brain = before[c] != 0
        assert brain.sum() > 10  # every channel has a brain to normalise
        values = before[c][brain].astype(np.float64)
        std = values.std() or 1.0
        np.testing.assert_allclose(got[c][brain], (values - values.mean()) / std, rtol=1e-5, atol=1e-5)
        assert (got[c][~brain] == 0).all()
    assert got.dtype == np.float32 and (got[2] == 0).all()
