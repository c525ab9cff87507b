"""``losslab train`` under ``torchrun --nproc_per_node 2`` (gloo on CPU) against one process with the
same effective batch: the same validation metrics within a stated tolerance, one MLflow run (rank 0's),
checkpoints interchangeable with single-process ones, and the data sharded (not duplicated) over ranks.

Why not exact equality: DDP averages the gradients of 2 ranks × 2 bags, i.e. the mean over the same
4-bag effective batch as the single process, but (1) ``DistributedSampler`` shuffles with its own
(seed, epoch) generator, so the batches hold other bags in another order, (2) BatchNorm in the backbone
normalises over each rank's 2 bags (8 instances) instead of 4, and its running statistics are rank 0's
(DDP broadcasts rank 0's buffers), and (3) the random bag slices come from each process's own RNG.
Measured on the test cohort (20 training / 10 validation cases, 2 epochs, seed 0): |Δ val/loss| =
0.004 after epoch 0 and 0.010 after epoch 1; train/loss differs by 0.037 in epoch 0 (other batches) and
0.005 in epoch 1; balanced accuracy is equal (0.5); AUC differs by 0.19 = 4 of its 3 × 7 = 21
positive/negative pairs. Tolerances: 0.03 on val/loss and val/log_loss (3× the measured gap, below the
0.05 that a different model, e.g. seed 1, moves them), 0.08 on train/loss, 0.25 on balanced accuracy
(one of the 3 minority cases flipping moves it 1/6) and 0.3 on AUC (≤ 6 of 21 pairs; AUC on 10 cases
is the noisiest number here). The exact checks are structural: one FINISHED run, the same number of
optimiser steps (so each rank saw half the data), world size and effective batch logged as params.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from losslab.config import dump_yaml
from losslab.engine.checkpoint import load_checkpoint
from losslab.pipelines.train import build_components

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = {"val/loss": 0.03, "val/log_loss": 0.03, "val/balanced_accuracy": 0.25, "val/auc": 0.3}


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))


def _only_run(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def _history(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_torchrun_two_ranks_matches_one_process_and_logs_one_run(make_config, small_cache, tmp_path):
    common = ("train.epochs=2", "train.progress=false", "data.sampler=none", "train.device=cpu")
    ddp_cfg = make_config(*common, experiment="ddp-two-ranks")
    single_cfg = make_config(*common, "data.batch_size=4", experiment="ddp-one-process")
    overrides = ["-o", "data.batch_size=2"]  # per rank: effective batch 2 × 2 = 4
    ddp_yaml, single_yaml = tmp_path / "ddp.yaml", tmp_path / "single.yaml"
    ddp_yaml.write_text(dump_yaml(ddp_cfg))
    single_yaml.write_text(dump_yaml(single_cfg))

    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "losslab.cli", "train", "-c", str(ddp_yaml), *overrides],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stdout[-4000:] + ddp.stderr[-8000:]
    assert "backend gloo" in ddp.stderr and "rank 1/2" in ddp.stderr
    assert ddp.stdout.count("fold 0: FINISHED") == 1  # printed by rank 0 only
    single = subprocess.run([sys.executable, "-m", "losslab.cli", "train", "-c", str(single_yaml)],
                            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-8000:]

    client = MlflowClient()
    ddp_run, single_run = _only_run(client, "ddp-two-ranks"), _only_run(client, "ddp-one-process")
    assert ddp_run.info.status == "FINISHED"
    assert ddp_run.data.params["ddp.world_size"] == "2" and ddp_run.data.params["data.effective_batch_size"] == "4"
    assert single_run.data.params["ddp.world_size"] == "1" and single_run.data.params["data.effective_batch_size"] == "4"

    for key, tol in TOLERANCE.items():
        got, expected = _history(client, ddp_run.info.run_id, key), _history(client, single_run.info.run_id, key)
        assert len(got) == len(expected) == 2, key
        assert got[-1] == pytest.approx(expected[-1], abs=tol), (key, got, expected)
    got, expected = _history(client, ddp_run.info.run_id, "train/loss"), _history(client, single_run.info.run_id, "train/loss")
    assert got == pytest.approx(expected, abs=0.08)
    n_val = int((small_cache.index["fold"] == 0).sum())  # rank 0 validated the whole validation set
    counts = [sum(v) for v in zip(*(_history(client, ddp_run.info.run_id, f"val/pred_count_{c}") for c in ("LGG", "HGG")))]
    assert counts == [n_val, n_val]

    def last_checkpoint(run_id):  # the uploaded copy (the local one is removed after the upload)
        return load_checkpoint(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/last.pt",
                                                                   dst_path=str(tmp_path / run_id)))

    ddp_ckpt, single_ckpt = last_checkpoint(ddp_run.info.run_id), last_checkpoint(single_run.info.run_id)
    # each rank took half the data: as many optimiser steps as one process with the doubled batch
    assert ddp_ckpt["global_step"] == single_ckpt["global_step"] > 0
    assert set(ddp_ckpt["model"]) == set(single_ckpt["model"])  # no "module." prefix: interchangeable
    train_counts = np.bincount(small_cache.index.query("fold != 0 and fold >= 0")["label"], minlength=2).tolist()
    _, model = build_components(ddp_cfg, train_counts)
    model.load_state_dict(ddp_ckpt["model"])
    # only rank 0 wrote checkpoints (one per run, uploaded, then the local copies removed)
    assert not any(Path(ddp_cfg.train.checkpoint_dir).iterdir())


def test_torchrun_refuses_frozen_backbone_with_the_option_in_the_error(make_config, tmp_path):
    cfg = make_config("train.epochs=1", "train.progress=false", "train.device=cpu", "train.freeze_backbone_epochs=1",
                      "tracking.log_model=false", experiment="ddp-refused")
    path = tmp_path / "cfg.yaml"
    path.write_text(dump_yaml(cfg))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "losslab.cli", "train", "-c", str(path)],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert "train.freeze_backbone_epochs" in proc.stderr
    run = _only_run(MlflowClient(), "ddp-refused")  # rank 0 opened the run and ended it FAILED
    assert run.info.status == "FAILED" and "freeze_backbone_epochs" in run.data.tags["losslab.error"]


def test_a_nan_on_one_rank_stops_every_rank_with_the_same_line(make_config, tmp_path):
    """Rank 1's loss is NaN at batch 1 while rank 0's is finite (the NaN reaches rank 0's weights only through
    that step's gradient all-reduce): the non-finite flag is gathered over the ranks, so both ranks stop at
    the same check with the same one line, and rank 0's run is FAILED with it (not a rank left waiting in
    the next all-reduce until torchrun kills it)."""
    import time

    cfg = make_config("train.epochs=1", "train.progress=false", "train.device=cpu", "data.sampler=none",
                      "data.batch_size=2", "train.finite_check_every=1", "loss.name=ce", "tracking.log_model=false",
                      experiment="ddp-nan-one-rank")
    # the loss exists only in the launched processes (tests/_ddp_nan_rank.py registers it there)
    path = tmp_path / "cfg.yaml"
    path.write_text(dump_yaml(cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"name": "nan_on_rank_one"})})))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "tests" / "_ddp_nan_rank.py"), "train", "-c", str(path)],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - start
    line = "losslab: NonFiniteLossError: non-finite training loss (nan) at epoch 0, batch 1 on rank 1 of 2"
    assert proc.returncode != 0
    assert proc.stderr.count(line) == 2, proc.stderr[-6000:]  # rank 0 and rank 1, the same line
    run = _only_run(MlflowClient(), "ddp-nan-one-rank")
    assert run.info.status == "FAILED"
    assert run.data.tags["losslab.error"] == line[len("losslab: "):], run.data.tags["losslab.error"]
    assert elapsed < 120, elapsed


def test_segmentation_trains_under_torchrun_and_validates_every_volume_like_one_process(tmp_path_factory, tmp_path):
    """Segmentation under torchrun (2 CPU ranks, gloo) with ``data.num_workers: auto``: the training patients
    are sharded over the ranks (``DistributedSampler``), rank 0 validates on every validation volume, so the
    run's best-epoch metrics are the numbers one process gets from the same weights (``evaluate --split val``)."""
    from _data_factories import generate_embedded_brats

    root = generate_embedded_brats(tmp_path_factory, "ddp-seg", seed=5, num_cases=8, shape=(32, 32, 16))
    overrides = [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.num_folds=2", "data.test_fraction=0",
                 "data.salt=test-salt", "data.batch_size=1", "data.num_workers=auto", "seg.patch_size=[16, 16, 16]",
                 "seg.samples_per_case=1", "seg.hd95=false", "train.epochs=2", "train.device=cpu",
                 "train.progress=false", f"train.checkpoint_dir={tmp_path / 'ckpt'}", "tracking.experiment=ddp-seg",
                 "tracking.log_model=false", "optim.lr=0.01"]
    args = ["train", "-c", str(REPO / "configs" / "experiment" / "seg_dice.yaml")] + [a for o in overrides for a in ("-o", o)]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "losslab.cli", *args], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=480)
    assert ddp.returncode == 0, ddp.stdout[-4000:] + ddp.stderr[-8000:]
    assert "backend gloo" in ddp.stderr and "rank 1/2" in ddp.stderr
    client = MlflowClient()
    run = _only_run(client, "ddp-seg")
    assert run.info.status == "FINISHED" and run.data.params["ddp.world_size"] == "2"
    assert len(_history(client, run.info.run_id, "val/mean_dice")) == 2
    one = subprocess.run([sys.executable, "-m", "losslab.cli", "evaluate", "--model", run.info.run_id, "--split", "val"],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stdout[-4000:] + one.stderr[-8000:]
    evaluated = next(r for r in client.search_runs([client.get_experiment_by_name("ddp-seg").experiment_id])
                     if r.info.run_id != run.info.run_id).data.metrics
    for key in ("mean_dice", "dice_wt", "dice_tc", "dice_et", "loss"):
        assert evaluated[f"val/{key}"] == pytest.approx(run.data.metrics[f"best_val/{key}"], abs=1e-6), key
