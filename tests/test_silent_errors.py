"""Silent errors found by reading the code (issue #28), each pinned by a test that failed on the code
before its fix: the sweep's direction follows its metric; the sweep's pre-check builds a segmentation
loss for every channel, as training does; mixup records ``λ·terms(a) + (1−λ)·terms(b)``; evaluate
checks what the *loaded* model can do and refuses what does not apply in one line.

Real SQLite MLflow store (the session fixture), real tiny runs, no mocks.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from losslab.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- 1. the sweep's direction
@pytest.mark.parametrize("metric, expected", [
    ("val/loss", "minimize"), ("val/log_loss", "minimize"), ("val/ece", "minimize"), ("val/hd95_WT", "minimize"),
    ("test/rsna_weighted_log_loss", "minimize"), ("val/dead_class_count", "minimize"),
    ("val/mean_dice", "maximize"), ("val/auc", "maximize"), ("val/min_class_recall", "maximize"),
])
def test_sweep_direction_follows_the_metric_not_the_monitor_mode(metric, expected):
    """With the default monitor (balanced accuracy, max) and no ``sweep.direction``, a loss, ECE or
    HD95 objective is minimised and a rate or Dice maximised."""
    from losslab.pipelines.sweep import SweepSettings, metric_and_direction

    cfg = load_config(None, [])
    assert (cfg.train.monitor, cfg.train.monitor_mode) == ("val/balanced_accuracy", "max")
    settings = SweepSettings.model_validate({"metric": metric, "space": {"optim.lr": {"type": "float", "low": 0.1,
                                                                                       "high": 0.2}}})
    assert metric_and_direction(cfg, settings) == (metric, expected)
    # an explicit direction always wins
    forced = settings.model_copy(update={"direction": "maximize"})
    assert metric_and_direction(cfg, forced) == (metric, "maximize")


def test_sweep_refuses_a_metric_whose_direction_it_cannot_tell():
    from losslab.pipelines.sweep import SweepSettings, metric_and_direction

    cfg = load_config(None, [])
    settings = SweepSettings.model_validate({"metric": "val/pred_count_HGG", "space": {}})
    with pytest.raises(ConfigError, match=r"^sweep.metric=val/pred_count_HGG: .*set sweep.direction"):
        metric_and_direction(cfg, settings)
    # the monitor with its mode set explicitly: that mode
    monitored = load_config(None, ["train.monitor=val/pred_count_HGG", "train.monitor_mode=min"])
    assert metric_and_direction(monitored, SweepSettings.model_validate({"space": {}})) == ("val/pred_count_HGG",
                                                                                             "minimize")


# ----------------------------------------------------------------------------- 5. the sweep's pre-check, K classes
@pytest.fixture(scope="module")
def seg_classes_cache(tmp_path_factory):
    """A tiny BraTS-layout segmentation cache with exclusive classes (background first)."""
    from _data_factories import generate_embedded_brats

    root = generate_embedded_brats(tmp_path_factory, "silent-seg-classes", seed=7, num_cases=6, shape=(24, 24, 12))
    work = tmp_path_factory.mktemp("silent-seg-classes-work")
    cfg = load_config(REPO / "configs" / "experiment" / "seg_focal.yaml", [
        f"data.root={root}", f"data.cache_dir={work / 'cache'}", "data.num_folds=2", "data.test_fraction=0.0",
        "data.salt=test-salt", "seg.labels=classes", "seg.patch_size=[16, 16, 8]", "seg.hd95=false",
        "train.epochs=1", "train.device=cpu", f"train.checkpoint_dir={work / 'ckpt'}"])
    from losslab.tasks import task_of

    return cfg, task_of(cfg).build_cache(cfg)


def test_sweep_precheck_builds_a_segmentation_loss_for_every_channel(seg_classes_cache, tmp_path):
    """Training builds a ``classes`` segmentation loss for K channels (background included): a K-long
    ``alpha`` passes the pre-check and a K−1-long one is refused before any trial."""
    from losslab.pipelines.sweep import apply_trial_overrides, check_space, sweep_settings
    from losslab.tasks import task_of

    cfg, info = seg_classes_cache
    k = len(info.channel_names)
    assert k == len(info.class_names) + 1 and k >= 3  # background + the classes
    right, wrong = [round(0.1 * (c + 1), 2) for c in range(k)], [0.25] * (k - 1)
    # what training does with each (the second code path): the task builds the loss for K channels
    task_of(cfg).build(apply_trial_overrides(cfg, [f"loss.alpha={right}"]), info.channel_names)
    with pytest.raises(ValueError, match="alpha"):
        task_of(cfg).build(apply_trial_overrides(cfg, [f"loss.alpha={wrong}"]), info.channel_names)

    def settings(alpha):  # the base config's alpha, a space over gamma
        base = apply_trial_overrides(cfg, [f"loss.alpha={alpha}"])
        space = {"loss.gamma": {"type": "float", "low": 0.0, "high": 2.0}}
        with_sweep = base.model_copy(update={"sweep": {"storage": f"sqlite:///{tmp_path / 'o.db'}", "space": space}})
        return with_sweep, sweep_settings(with_sweep)

    check_space(*settings(right), info)
    with pytest.raises(ConfigError, match=r"sweep.space.loss.gamma = 0.0 .*alpha"):
        check_space(*settings(wrong), info)


# ----------------------------------------------------------------------------- 6. mixup records both halves' terms
def test_mixup_records_the_mixed_loss_terms(make_config, small_cache, tmp_path):
    """One training batch of a CE + focal compound loss under mixup: ``train/loss_<term>`` is
    ``λ·term(logits, y_a) + (1−λ)·term(logits, y_b)``, each term computed here by hand from the logits
    and the two targets the loss saw (read with a forward hook), and λ from ``train/loss`` =
    ``λ·L(y_a) + (1−λ)·L(y_b)``."""
    from losslab.engine.loop import fit, seed_everything
    from losslab.pipelines.train import build_components, make_datasets, make_loaders

    cfg = make_config("train.device=cpu", "train.epochs=1", "train.max_train_batches=1", "train.mixup_alpha=0.4",
                      "data.sampler=none", "loss=compound", "loss.weighting=fixed",
                      "loss.terms=[{name: ce, weight: 0.7}, {name: focal, weight: 0.3, gamma: 2.0}]")
    seed_everything(3)
    train_ds, val_ds = make_datasets(cfg, small_cache, 0)
    counts = torch.bincount(torch.as_tensor(train_ds.labels), minlength=2).tolist()
    loss_fn, model = build_components(cfg, counts)
    train_loader, val_loader = make_loaders(cfg, train_ds, val_ds)
    seen = []
    loss_fn.register_forward_hook(lambda module, args, out: seen.append(
        (args[0].detach().clone(), args[1].clone(), out.detach().clone())) if torch.is_grad_enabled() else None)
    state = fit(model, loss_fn, train_loader, val_loader, cfg.train.model_copy(update={"checkpoint_dir": str(tmp_path)}),
                cfg.optim, small_cache.class_names)
    (logits, y_a, loss_a), (logits_b, y_b, loss_b) = seen  # one batch: the y_a forward, then the y_b forward
    assert torch.equal(logits, logits_b) and not torch.equal(y_a, y_b)
    recorded = state.history["train/loss"][0]
    lam = (recorded - float(loss_b)) / (float(loss_a) - float(loss_b))
    assert 0.0 < lam < 1.0 and abs(float(loss_a) - float(loss_b)) > 1e-3

    def ce(y):
        return float(F.cross_entropy(logits.double(), y))

    def focal(y):  # -(1 - p_t)^2 log p_t, mean over the batch
        log_p = F.log_softmax(logits.double(), dim=1).gather(1, y[:, None]).squeeze(1)
        return float((-(1 - log_p.exp()) ** 2 * log_p).mean())

    assert float(loss_a) == pytest.approx(0.7 * ce(y_a) + 0.3 * focal(y_a), abs=1e-5)  # the terms are what we think
    assert state.history["train/loss_ce"][0] == pytest.approx(lam * ce(y_a) + (1 - lam) * ce(y_b), abs=1e-5)
    assert state.history["train/loss_focal"][0] == pytest.approx(lam * focal(y_a) + (1 - lam) * focal(y_b), abs=1e-5)


# ----------------------------------------------------------------------------- 2. evaluate: the loaded model's task
@pytest.fixture(scope="module")
def seg_run(tmp_path_factory, mlflow_store):
    """One tiny segmentation train run (1 epoch) with held-out test patients; its cache is scored again below."""
    from _data_factories import generate_embedded_brats

    from losslab.pipelines.train import run_train

    root = generate_embedded_brats(tmp_path_factory, "silent-seg", seed=5, num_cases=8, shape=(24, 24, 12))
    work = tmp_path_factory.mktemp("silent-seg-work")
    cfg = load_config(REPO / "configs" / "experiment" / "seg_dice.yaml", [
        f"data.root={root}", f"data.cache_dir={work / 'cache'}", "data.num_folds=2", "data.test_fraction=0.25",
        "data.salt=test-salt", "data.batch_size=2", "seg.patch_size=[16, 16, 8]", "seg.samples_per_case=1",
        "seg.hd95=false", "train.epochs=1", "train.device=cpu", f"train.checkpoint_dir={work / 'ckpt'}",
        f"tracking.experiment=silent-seg-{uuid.uuid4().hex[:6]}", "tracking.log_model=false"])
    torch.set_num_threads(1)
    fold = run_train(cfg).folds[0]
    return cfg, fold.run_id


def _evaluate_runs(experiment_id: str) -> int:
    runs = MlflowClient().search_runs([experiment_id], "tags.`losslab.entry_point` = 'evaluate'")
    return len(runs)


def test_evaluate_checks_the_loaded_segmentation_model_not_the_command_line_config(seg_run, monkeypatch):
    """No ``-c``: the command line's config is the default (a classifier), the model a segmentation
    network. Its test split is scored as train scored it; another cache, calibration and a cache
    split without a cache are refused in one line, and no evaluate run is logged for them."""
    from losslab.pipelines.evaluate import run_evaluate

    seg_cfg, run_id = seg_run
    monkeypatch.setenv("LOSSLAB_SALT", "test-salt")  # the run's config.yaml holds only the salt's fingerprint
    client = MlflowClient()
    run = client.get_run(run_id)
    default = load_config(None, [])
    assert default.model.kind != "segmentation"
    scored = run_evaluate(default, source=run_id).metrics  # split test, the default; the loaded model's task
    dice = [k for k in run.data.metrics if k.startswith("test/dice_")]
    assert len(dice) == 3
    for key in dice + ["test/mean_dice", "test/loss"]:
        assert scored[key] == pytest.approx(run.data.metrics[key], abs=1e-6), key
    before = _evaluate_runs(run.info.experiment_id)
    with pytest.raises(ValueError, match=r"^evaluate.split=cache: .* segmentation model"):
        run_evaluate(default, source=run_id, split="cache", cache_dir=seg_cfg.data.cache_dir)
    with pytest.raises(ValueError, match=r"^evaluate.split=cache needs evaluate.cache_dir"):
        run_evaluate(default, source=run_id, split="cache")
    asked = default.model_copy(update={"evaluate": {"calibration": {"enabled": True}, "tta": {"passes": 2},
                                                    "latency": {"enabled": False}}})
    with pytest.raises(ValueError, match=r"^evaluate.calibration, evaluate.tta: .* segmentation model"):
        run_evaluate(asked, source=run_id)
    assert _evaluate_runs(run.info.experiment_id) == before


def test_evaluate_refuses_data_overrides_for_a_run_source(seg_run, monkeypatch, capsys):
    """``losslab evaluate -m <run id> -o data.cache_dir=...``: the run is scored on its own
    ``config.yaml``, so the override is refused in one line (exit 1) instead of being dropped."""
    from losslab.cli import run as cli_run

    _, run_id = seg_run
    monkeypatch.setenv("LOSSLAB_SALT", "test-salt")
    experiment_id = MlflowClient().get_run(run_id).info.experiment_id
    before = _evaluate_runs(experiment_id)
    assert cli_run(["evaluate", "-m", run_id, "-o", "data.cache_dir=/nowhere/else"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("losslab:")]  # not MLflow's bars
    assert len(err) == 1 and err[0].startswith("losslab: ValueError: data.cache_dir=/nowhere/else: ") \
        and "config.yaml" in err[0], err
    assert _evaluate_runs(experiment_id) == before


# ----------------------------------------------------------------------------- 9. distillation on the test split
TINY_MODEL = ("{image: {backbone: test_vit, kwargs: {img_size: 32, patch_size: 8}}, "
              "text: {dim: 32, depth: 1, max_length: 24}, fusion: cross_attention, fusion_dim: 32, fusion_layers: 1}")


def test_distill_scores_every_run_on_the_held_out_test_split(tmp_path, mlflow_store):
    """With ``data.test_fraction`` the teacher and students log ``test/<task>/…`` next to ``best_val/*``:
    the registered student, applied here to the cache's fold −1 cases and scored with scikit-learn, gives
    its run's ``test/<task>/accuracy``; ``distillation_table`` reads the test split by default."""
    import numpy as np
    from sklearn.metrics import accuracy_score
    from torch.utils.data import DataLoader

    from losslab.data.text import ImageTextDataset, collate_image_text
    from losslab.pipelines.distill import distillation_table, run_distill
    from losslab.pipelines.registry import load_registered_model
    from losslab.tasks import MultitaskStep

    experiment, student_name = f"silent-distill-{uuid.uuid4().hex[:6]}", f"silent-student-{uuid.uuid4().hex[:6]}"
    cfg = load_config(None, [
        f"data.root={tmp_path / 'raw'}", "data.source=manifest", "data.generate=embedded_medpix",
        "data.generator_kwargs={num_samples: 60, image_size: 32}", f"data.cache_dir={tmp_path / 'cache'}",
        "data.num_folds=3", "data.test_fraction=0.25", "data.salt=test-salt", "data.batch_size=16", "data.seed=0",
        "train.epochs=1", "train.seed=0", "train.device=cpu", f"train.checkpoint_dir={tmp_path / 'ckpt'}",
        f"tracking.experiment={experiment}", "distill.tasks=[modality, location]", "distill.losses=[vanilla]",
        f"distill.teacher.model={TINY_MODEL}", "distill.teacher.epochs=1", "distill.teacher.registered_model_name=null",
        f"distill.student.model={TINY_MODEL}", f"distill.student.registered_model_name={student_name}"])
    torch.set_num_threads(1)
    result = run_distill(cfg)
    client = MlflowClient()
    parent = client.get_run(result.parent_run_id).data.params
    from losslab.data.cache import build_cache

    index = build_cache(cfg.data).index
    test_rows = index[index["fold"] == -1].reset_index(drop=True)
    assert int(parent["data.n_test"]) == len(test_rows) > 0
    for run_id in [result.teacher_run_id, *result.student_run_ids.values()]:
        metrics = client.get_run(run_id).data.metrics
        for task in ("modality", "location"):
            assert 0.0 <= metrics[f"test/{task}/accuracy"] <= 1.0 and f"best_val/{task}/accuracy" in metrics
    vanilla = client.get_run(result.student_run_ids["vanilla"]).data.metrics
    (version,) = [v for v in client.search_model_versions(f"name='{student_name}'")
                  if v.tags.get("run_id") == result.student_run_ids["vanilla"]]
    model = load_registered_model(f"models:/{student_name}/{version.version}").model
    task_classes = json.loads(parent["distill.task_classes"])
    prep = model.preprocessing
    data = ImageTextDataset(test_rows, cfg.data.cache_dir, task_classes, model.tokenizer, model.max_length,
                            prep["image_mean"], prep["image_std"])
    outputs = MultitaskStep(task_classes).predict(model, DataLoader(data, batch_size=7, collate_fn=collate_image_text),
                                                 torch.device("cpu"))
    for task in task_classes:
        expected = accuracy_score(data.labels[task], np.argmax(outputs["logits"][task], axis=1))
        assert vanilla[f"test/{task}/accuracy"] == pytest.approx(expected, abs=1e-9), task
    table = distillation_table(experiment, parent_run_id=result.parent_run_id)
    assert table["split"].tolist() == ["test"] * 3
    row = table.set_index("loss").loc["vanilla"]
    assert row["location/accuracy"] == pytest.approx(vanilla["test/location/accuracy"])
