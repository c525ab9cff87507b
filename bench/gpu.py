"""Training throughput on the accelerator, per setting of issue #23: how busy the GPU is kept.

Per setting, three measurements on the same model, loss, optimiser (AdamW) and training loader:

* ``bare``: a hand-written loop (bf16 autocast on CUDA only): forward, loss, backward, step; the
  second of two epochs is timed.
* ``fit``: :func:`losslab.engine.loop.fit` (validation, metrics, checkpoints, callbacks); the
  training part of each epoch after the first is timed (``train``), and the whole epoch with
  validation (``epoch``). Host syncs per training step are counted with ``torch.profiler`` over the
  training part of the second epoch, as two columns: ``aten::_local_scalar_dense`` (every read of a
  tensor's value on the host, ``.item()``; on a CPU also reads that wait for nothing, such as the
  optimiser's step counters) and ``cudaStreamSynchronize``.
* ``ceiling``: one batch already on the device, forward + backward + step only (no loader).

Columns: samples/s, mean GPU utilisation sampled every 100 ms by ``nvidia-smi`` during the phase
(empty on CPU), peak GPU memory (empty on CPU). Settings (the embedded BraTS-layout generator):

* ``demo``: configs/experiment/demo.yaml (MIL resnet10t, 64², bag 12, batch 4).
* ``mil128``: MIL resnet18 at 128², bag 32, batch 16.
* ``vol3d``: the 3D MONAI ResNet-10 at 64² × 32, batch 8.
* ``seg``: configs/experiment/seg_dice.yaml (the 3D UNet on 32³ patches).
* ``brats``: a BraTS-size cohort: ``--cases`` (60) cases generated at 240 × 240 × 155, preprocessed
  once (slices at 128², cache size and time printed), the 3D ResNet-10 at 128² × 64, batch 8.

Data and caches live under ``--work-dir`` (default a temporary folder) and are reused when present,
so a second run does not generate or preprocess again. ``--quick`` shrinks everything (16 cases, a
96 × 96 × 62 BraTS cohort, batch 2, small bags) to check the script on a CPU in a few minutes.

    python bench/gpu.py [--setting demo mil128 vol3d seg brats] [--cases 60] [--work-dir DIR]
    python bench/gpu.py --quick            # CPU smoke run
    python bench/gpu.py -o data.train_data_on_device=true -o data.num_workers=0
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from loader import SETTINGS as LOADER_SETTINGS
from losslab.engine.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
# name: (config, generated shape (x, y, z), overrides): the loader bench's settings (this folder is
# on sys.path when a bench runs as a script), plus segmentation and a BraTS-size cohort
SETTINGS = {
    **LOADER_SETTINGS,
    "seg": ("configs/experiment/seg_dice.yaml", (64, 64, 32), []),
    "brats": ("configs/experiment/brats_resnet3d.yaml", (240, 240, 155),
              ["data.image_size=128", "data.volume_depth=64", "data.volume_size=[128, 128]", "data.batch_size=8"]),
}
QUICK = ["data.batch_size=2", "data.bag_size=4", "data.volume_depth=16", "data.volume_size=[32, 32]",
         "data.image_size=32", "seg.hd95=false", "seg.patch_size=[16, 16, 16]", "data.num_folds=2"]
SYNC_EVENTS = {"item/step": "aten::_local_scalar_dense", "stream syncs/step": "cudaStreamSynchronize"}


def setting_config(name: str, args, work: Path):
    """The config of setting ``name``: its own generated cohort and cache under ``work``."""
    from losslab.config import load_config

    path, shape, overrides = SETTINGS[name]
    if args.quick and name == "brats":
        shape = (96, 96, 62)
    cohort = work / f"cohort_{args.cases}_{'x'.join(map(str, shape))}"
    base = [f"data.root={cohort}", "data.generate=embedded_brats",
            f"data.generator_kwargs={{num_cases: {args.cases}, hgg_ratio: 2.8, shape: {list(shape)}}}",
            f"data.cache_dir={work / ('cache_' + name)}", "data.salt=bench", f"data.num_workers={args.workers}",
            f"train.epochs={args.epochs}", f"train.checkpoint_dir={work / 'ckpt' / name}", "train.progress=false",
            "train.device=auto"]
    return load_config(REPO / path, base + overrides + (QUICK if args.quick else []) + args.override)


def build_setting(name: str, args, work: Path):
    """``(cfg, task, fold setup)``; prints the cache's build time and size."""
    from losslab.tasks import task_of

    cfg = setting_config(name, args, work)
    task = task_of(cfg)
    t0 = time.perf_counter()
    info = task.build_cache(cfg)
    cache_s = time.perf_counter() - t0
    cache_bytes = sum(p.stat().st_size for p in Path(cfg.data.cache_dir).rglob("*") if p.is_file())
    t0 = time.perf_counter()
    setup = task.setup_fold(cfg, info, cfg.data.fold)
    print(f"\n== {name}: {cfg.model.kind}/{cfg.model.backbone}, batch {cfg.data.batch_size}, "
          f"{len(setup.train_loader)} training batches; generate + preprocess {cache_s:.1f} s (0 when reused), "
          f"cache {cache_bytes / 2**30:.2f} GiB; datasets and model {time.perf_counter() - t0:.1f} s", flush=True)
    return cfg, setup.step, setup


@contextmanager
def gpu_utilisation(device: torch.device):
    """Samples ``nvidia-smi`` utilisation every 100 ms while the block runs; ``samples`` is the list
    of percentages (empty on a CPU or without nvidia-smi)."""
    samples: list[float] = []
    tool = shutil.which("nvidia-smi") if device.type == "cuda" else None
    process = None
    if tool:
        process = subprocess.Popen([tool, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                    "-lms", "100", "-i", str(device.index or 0)], stdout=subprocess.PIPE, text=True)
    try:
        yield samples
    finally:
        if process is not None:
            process.terminate()
            output, _ = process.communicate()
            samples.extend(float(v) for v in output.split() if v.strip().replace(".", "", 1).isdigit())


def measure(device: torch.device, run) -> dict[str, str]:
    """``run()`` -> (samples, seconds, extra columns); adds utilisation and peak GPU memory."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with gpu_utilisation(device) as utilisation:
        samples, seconds, extra = run()
    row = {"samples/s": f"{samples / seconds:.1f}", "GPU util %": "", "peak GiB": ""}
    if utilisation:
        row["GPU util %"] = f"{statistics.mean(utilisation):.0f}"
    if device.type == "cuda":
        row["peak GiB"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}"
    return row | extra


def _train_step(task, model, loss_fn, optimizer, batch, device, amp: bool) -> torch.Tensor:
    from losslab.engine.steps import autocast

    target = task.target(batch, device)
    with autocast(device, amp):
        out = task.forward(model, batch, device)
    loss = task.loss(loss_fn, out, target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def bare(cfg, task, setup, device):
    """Two epochs of the plain loop; the second is timed."""
    model, loss_fn = setup.model.to(device).train(), setup.loss_fn.to(device)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(loss_fn.parameters()), lr=cfg.optim.lr)
    for epoch in range(2):
        t0, samples = time.perf_counter(), 0
        for batch in setup.train_loader:
            _train_step(task, model, loss_fn, optimizer, batch, device, cfg.train.amp)
            samples += batch["image"].shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return samples, time.perf_counter() - t0, {}


def ceiling(cfg, task, setup, device, steps: int):
    """``steps`` training steps on one batch already on the device (after 3 untimed ones)."""
    model, loss_fn = setup.model.to(device).train(), setup.loss_fn.to(device)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(loss_fn.parameters()), lr=cfg.optim.lr)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(iter(setup.train_loader)).items()}
    for i in range(steps + 3):
        if i == 3:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        _train_step(task, model, loss_fn, optimizer, batch, device, cfg.train.amp)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch["image"].shape[0], time.perf_counter() - t0, {}


class FitTimer(Callback):
    """Times the training part and the whole of each epoch; profiles the training part of epoch 1
    and counts its host syncs (profiler events of :data:`SYNC_EVENTS`) and steps."""

    def __init__(self) -> None:
        self.train_s: list[float] = []
        self.epoch_s: list[float] = []
        self.steps = 0
        self.syncs = dict.fromkeys(SYNC_EVENTS, 0)
        self._profiler = None
        self._t_epoch = self._t_train = 0.0

    def on_epoch_start(self, state):
        self._t_epoch = time.perf_counter()

    def on_train_epoch_start(self, state):
        if len(self.epoch_s) == 1:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.__enter__()
        self._t_train = time.perf_counter()

    def on_train_batch_end(self, state, batch_index, loss):
        if self._profiler is not None:
            self.steps += 1

    def on_train_epoch_end(self, state):
        self.train_s.append(time.perf_counter() - self._t_train)
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            counts = {e.key: e.count for e in self._profiler.key_averages()}
            self.syncs = {column: counts.get(event, 0) for column, event in SYNC_EVENTS.items()}
            self._profiler = None

    def on_epoch_end(self, state, metrics):
        self.epoch_s.append(time.perf_counter() - self._t_epoch)


def run_fit(cfg, task, setup, device, samples_per_epoch: int):
    """``fit`` for ``train.epochs`` epochs; the first epoch (and the profiled second) are warm-up
    when there are more; reports the training part's samples/s and the whole epoch's."""
    from losslab.engine.loop import fit

    timer = FitTimer()
    fit(setup.model, setup.loss_fn, setup.train_loader, setup.val_loader, cfg.train, cfg.optim, setup.names,
        callbacks=list(setup.callbacks) + [timer], step=setup.step)
    timed = slice(2, None) if len(timer.train_s) > 2 else slice(-1, None)
    train_s, epoch_s = statistics.median(timer.train_s[timed]), statistics.median(timer.epoch_s[timed])
    extra = {"epoch samples/s": f"{samples_per_epoch / epoch_s:.1f}"}
    extra |= {column: f"{count / max(timer.steps, 1):.2f}" for column, count in timer.syncs.items()}
    return samples_per_epoch, train_s, extra


def bench_setting(name: str, args, work: Path) -> None:
    cfg, task, setup = build_setting(name, args, work)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    samples_per_epoch = sum(batch["image"].shape[0] for batch in setup.train_loader)
    rows = {"bare": measure(device, lambda: bare(cfg, task, setup, device)),
            "fit": measure(device, lambda: run_fit(cfg, task, setup, device, samples_per_epoch)),
            "ceiling": measure(device, lambda: ceiling(cfg, task, setup, device, args.ceiling_steps))}
    columns = ["samples/s", "GPU util %", "peak GiB", "epoch samples/s"] + list(SYNC_EVENTS)
    print(f"| {name} | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for phase, row in rows.items():
        print(f"| {phase} | " + " | ".join(row.get(c, "") for c in columns) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--cases", type=int, default=None, help="cases per cohort (default 60; 16 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="fit epochs (default 4; 2 with --quick)")
    parser.add_argument("--ceiling-steps", type=int, default=None, help="timed steps (default 20; 3 with --quick)")
    parser.add_argument("--workers", default="auto", help="data.num_workers (an int or auto)")
    parser.add_argument("--work-dir", default=None, help="keeps the cohorts and caches for the next run")
    parser.add_argument("--quick", action="store_true", help="a small CPU smoke run")
    parser.add_argument("-o", "--override", action="append", default=[])
    args = parser.parse_args()
    args.cases = args.cases or (16 if args.quick else 60)
    args.epochs = args.epochs or (2 if args.quick else 4)
    args.ceiling_steps = args.ceiling_steps or (3 if args.quick else 20)
    import logging

    logging.disable(logging.WARNING)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"torch {torch.__version__} on {name}, {torch.get_num_threads()} threads; data.num_workers={args.workers}",
          flush=True)
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        for setting in args.setting:
            try:
                bench_setting(setting, args, work)
            except Exception as exc:  # the other settings still run; the failure is printed and the exit code says so
                print(f"\n== {setting} FAILED: {type(exc).__name__}: {exc}", flush=True)
                failed.append(setting)
    if failed:
        raise SystemExit(f"failed settings: {', '.join(failed)}")


if __name__ == "__main__":
    main()
