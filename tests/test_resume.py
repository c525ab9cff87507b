"""Resume: an interrupted fit continued from ``last.pt`` ends exactly like an uninterrupted one —
in process (EMA, SWA, frozen phase and mixup all on), and for real through the CLI after SIGKILL,
continuing the same MLflow run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from losslab.config import dump_yaml
from losslab.engine.callbacks import Callback
from losslab.engine.checkpoint import load_checkpoint
from losslab.engine.loop import fit, seed_everything
from losslab.pipelines.train import build_components, make_datasets, make_loaders

REPO = Path(__file__).resolve().parents[1]


class _Interrupt(Exception):
    pass


class _StopAt(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_start(self, state):
        if state.epoch == self.epoch:
            raise _Interrupt(f"stopped at epoch {self.epoch}")


def _fresh_fit(cfg, info, ckpt_dir, callbacks=None, resume_from=None):
    seed_everything(cfg.train.seed, True)
    train_ds, val_ds = make_datasets(cfg, info, 0)
    loss_fn, model = build_components(cfg, torch.bincount(torch.as_tensor(train_ds.labels), minlength=2).tolist())
    tl, vl = make_loaders(cfg, train_ds, val_ds)
    train_cfg = cfg.train.model_copy(update={"checkpoint_dir": str(ckpt_dir)})
    return fit(model, loss_fn, tl, vl, train_cfg, cfg.optim, info.class_names, callbacks=callbacks,
               resume_from=resume_from)


def test_resume_in_process_with_ema_swa_freeze_mixup_matches_uninterrupted(make_config, small_cache, tmp_path):
    cfg = make_config("train.device=cpu", "train.epochs=3", "train.max_train_batches=2", "train.ema_decay=0.9",
                      "train.swa_epochs=2", "train.swa_lr=0.002", "train.freeze_backbone_epochs=1",
                      "train.mixup_alpha=0.4", "optim.backbone_lr=0.001")
    reference = _fresh_fit(cfg, small_cache, tmp_path / "ref")
    with pytest.raises(_Interrupt):
        _fresh_fit(cfg, small_cache, tmp_path / "cut", callbacks=[_StopAt(2)])
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 1  # inside SWA, after the frozen phase
    resumed = _fresh_fit(cfg, small_cache, tmp_path / "cut", resume_from=tmp_path / "cut" / "last.pt")

    val_keys = [k for k in reference.history if k.startswith("val/")]
    assert val_keys and set(val_keys) == {k for k in resumed.history if k.startswith("val/")}
    for key in val_keys:
        assert resumed.history[key] == pytest.approx(reference.history[key], abs=1e-6, nan_ok=True), key
    a, b = load_checkpoint(tmp_path / "ref" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    for part in ("model", "ema", "swa"):
        for k, v in a[part].items():
            torch.testing.assert_close(b[part][k], v, rtol=0, atol=1e-6, msg=f"{part}.{k}")
    assert a["swa_scheduler"] == b["swa_scheduler"] and a["global_step"] == b["global_step"] == 6


def _val_metrics_at(client, run_id, step):
    run = client.get_run(run_id)
    out = {}
    for key in run.data.metrics:
        if key.startswith("val/"):
            hist = [m for m in client.get_metric_history(run_id, key) if m.step == step]
            assert len(hist) == 1, (key, hist)
            out[key] = hist[0].value
    return out


# `python -m losslab.cli` with every optimiser step half a second longer (torch's public global
# step hook), so that a signal reliably lands mid-epoch
SLOW_CLI = ("import runpy, time; from torch.optim.optimizer import register_optimizer_step_post_hook; "
            "register_optimizer_step_post_hook(lambda *args: time.sleep(0.5)); "
            "runpy.run_module('losslab.cli', run_name='__main__', alter_sys=True)")


def _cli(config_path, *args, env=None, cwd=None, slow=False):
    launch = ["-c", SLOW_CLI] if slow else ["-m", "losslab.cli"]
    return subprocess.Popen([sys.executable, *launch, "train", "-c", str(config_path), *args],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _signal_after_epoch_0(proc, client, experiment: str, signum: int) -> str:
    """Send ``signum`` to the training subprocess once epoch 0 is checkpointed and logged (it is then
    in epoch 1); return the run id."""
    try:
        run_id, deadline = None, time.monotonic() + 150
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            exp = client.get_experiment_by_name(experiment)
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs:
                run_id = runs[0].info.run_id
                if client.get_metric_history(run_id, "val/loss"):
                    break
            time.sleep(0.2)
        else:
            pytest.fail("the training subprocess did not finish epoch 0 in time")
        time.sleep(0.3)
        os.kill(proc.pid, signum)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    return run_id


def _train_then_signal(make_config, tmp_path, experiment: str, signum: int, *overrides: str):
    """``losslab train`` in a subprocess (half a second per batch), ``signum`` sent once epoch 0 is
    logged; returns the config, its file, the environment, the finished process and the run id."""
    cfg = make_config(*overrides, experiment=experiment)
    config_path = tmp_path / f"{experiment}.yaml"
    config_path.write_text(dump_yaml(cfg))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = _cli(config_path, env=env, cwd=tmp_path, slow=True)
    run_id = _signal_after_epoch_0(proc, MlflowClient(), experiment, signum)
    return cfg, config_path, env, proc, run_id


def test_sigkill_mid_epoch_then_resume_ends_like_uninterrupted_run(make_config, small_cache, tmp_path):
    # train/lr falls every epoch: with it as the monitor the best epoch (0) comes before the kill (in epoch 1)
    common = ("train.device=cpu", "train.epochs=3", "train.max_train_batches=3", "train.ema_decay=0.9",
              "tracking.log_model=false", "train.monitor=train/lr", "optim.warmup_epochs=0",
              "train.upload_checkpoint_every=0")
    killed_cfg, config_path, env, proc, run_id = _train_then_signal(make_config, tmp_path, "resume-killed",
                                                                    signal.SIGKILL, *common)
    client = MlflowClient()
    assert proc.returncode == -signal.SIGKILL
    ckpt_dir = Path(killed_cfg.train.checkpoint_dir) / run_id
    assert load_checkpoint(ckpt_dir / "last.pt")["epoch"] == 0  # killed inside epoch 1
    assert load_checkpoint(ckpt_dir / "best.pt")["epoch"] == 0
    assert client.list_artifacts(run_id, "checkpoints") == []  # SIGKILL: nothing was uploaded
    assert [m.step for m in client.get_metric_history(run_id, "val/loss")] == [0]
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody ended it

    resume = _cli(config_path, "--resume", run_id, env=env, cwd=tmp_path)
    out, _ = resume.communicate(timeout=240)
    assert resume.returncode == 0, out
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["losslab.resumed_from"].endswith("last.pt")
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [0, 1, 2]
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the same run, no new one
    # best.pt of epoch 0 (before the kill) survives the resume: evaluate on the run id scores it
    assert run.data.metrics["best_epoch"] == 0
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {"checkpoints/best.pt", "checkpoints/last.pt"}
    evaluate = subprocess.run([sys.executable, "-m", "losslab.cli", "evaluate", "-c", str(config_path), "--model", run_id,
                               "--split", "val", "-o", "evaluate.tta.enabled=false", "-o", "evaluate.latency.enabled=false"],
                              cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=240)
    assert evaluate.returncode == 0, evaluate.stderr[-4000:]
    ev_run = client.get_run(evaluate.stdout.split("evaluate run ")[1].split(":")[0])
    assert ev_run.data.metrics["test/balanced_accuracy"] == pytest.approx(run.data.metrics["best_val/balanced_accuracy"],
                                                                          abs=1e-6)

    # the uninterrupted reference runs as the killed run did: `losslab train` in a fresh process (an
    # in-process run inherits the test session's state, and differed in val/ece by 1.7e-6 in the suite)
    ref_cfg = make_config(*common, experiment="resume-reference")
    ref_path = tmp_path / "resume-reference.yaml"
    ref_path.write_text(dump_yaml(ref_cfg))
    ref = _cli(ref_path, env=env, cwd=tmp_path)
    ref_out, _ = ref.communicate(timeout=240)
    assert ref.returncode == 0, ref_out
    ref_exp = client.get_experiment_by_name("resume-reference")
    ref_run_id = client.search_runs([ref_exp.experiment_id], order_by=["attributes.start_time DESC"])[0].info.run_id
    expected = _val_metrics_at(client, ref_run_id, 2)
    got = _val_metrics_at(client, run_id, 2)
    assert expected.keys() == got.keys() and "val/balanced_accuracy" in got
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key


def test_sigterm_ends_the_run_killed_uploads_checkpoints_and_resume_clears_the_error(make_config, tmp_path):
    cfg, config_path, env, proc, run_id = _train_then_signal(
        make_config, tmp_path, "resume-sigterm", signal.SIGTERM, "train.device=cpu", "train.epochs=2",
        "train.max_train_batches=3", "tracking.log_model=false", "train.upload_checkpoint_every=0")
    client = MlflowClient()
    out = proc.stdout.read()
    assert proc.returncode == 143, out
    assert out.strip().splitlines()[-1] == "losslab: got SIGTERM (stopped from outside: a scheduler, `kill` or `docker stop`)"
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["losslab.error"].startswith("Terminated: got SIGTERM")
    artifacts = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert artifacts == {"checkpoints/best.pt", "checkpoints/last.pt"}  # uploaded on the way out ...
    assert not (Path(cfg.train.checkpoint_dir) / run_id).exists()  # ... so the local copies are gone

    resume = _cli(config_path, "--resume", run_id, env=env, cwd=tmp_path)
    out, _ = resume.communicate(timeout=240)
    assert resume.returncode == 0, out
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"  # resumed from the artifact
    assert "losslab.error" not in run.data.tags and "losslab.traceback" not in run.data.tags
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [0, 1]
