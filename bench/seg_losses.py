"""The segmentation loss study on the embedded BraTS-layout cohort, and the segmentation speed bars.

Part 1 (``--part losses``): every ``configs/experiment/seg_<loss>.yaml`` trains with the same budget
(cases, epochs, patches, optimiser) for each seed; the best epoch's checkpoint (by ``val/mean_dice`` on
the validation fold) is scored on the held-out test patients (``data.test_fraction``), and the table
gives mean ± std over the seeds of their Dice of the whole tumour (wt), tumour core (tc) and enhancing
tumour (et), the mean Dice (and each seed's), the HD95 (mm) per region, and the validation mean Dice
the checkpoint was chosen on. The table is
written by this script into ``docs/results.md`` between ``<!-- seg_losses:start -->`` and
``<!-- seg_losses:end -->`` (the rest of the file is left as it is).

Part 2 (``--part speed``), same model (UNet 3D), transforms, loss (compound dice + focal + boundary)
and data:

* training epoch: losslab's epoch (the training epoch of the engine's one loop,
  ``engine.loop._train_epoch`` with the segmentation task as its step: loss with distance maps, NaN
  check, clipping, scheduler, term and weight bookkeeping, callbacks) against a bare MONAI loop
  (``model(x)``, loss, backward, clipping, step) over the same loader; median seconds per epoch,
  bar ≤ 1.05;
* validation: :meth:`SegmentationTask.validate` (HD95 off; it also computes ``val/loss`` on whole
  volumes, with the compound loss and with Dice) against a direct ``sliding_window_inference`` +
  ``DiceMetric`` loop (the MONAI tutorial's: sigmoid > 0.5 as float masks); median volumes per second
  over ``--val-repeats`` alternating passes, bar ≥ 0.95, and the milliseconds per volume the whole-volume
  ``val/loss`` adds;
* peak memory (max RSS) of the embedded run: ``losslab train`` of ``seg_compound_learnable`` in a
  child process; bar < 4 GiB.

The speed part runs on ``--threads`` torch threads (default 2: the issue's two CPU cores, and what
``losslab train`` uses on a 2-core machine); the loss study on ``--study-threads`` (default 1, so a
second study can share the machine; it measures Dice, not time).

Prints numbers; asserts nothing. The study (about 18 minutes on one core) can run niced beside other
work; the speed part wants a quiet machine::

    nice -n 10 .venv/bin/python bench/seg_losses.py --part losses --epochs 30 --workdir /tmp/seg
    .venv/bin/python bench/seg_losses.py --part speed --workdir /tmp/seg
"""

from __future__ import annotations

import argparse
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LOSSES = ["dice", "dice_ce", "focal", "tversky", "focal_tversky", "boundary", "compound", "compound_learnable"]
REGIONS = ["wt", "tc", "et"]
START, END = "<!-- seg_losses:start -->", "<!-- seg_losses:end -->"


def _config(loss: str, tmp: Path, args, seed: int, *extra: str):
    from losslab.config import load_config

    return load_config(REPO / "configs" / "experiment" / f"seg_{loss}.yaml", [
        f"data.root={tmp / 'data'}", f"data.cache_dir={tmp / 'cache'}", "data.salt=bench", "data.generate=null",
        f"train.epochs={args.epochs}", f"train.seed={seed}", "train.device=cpu", f"train.checkpoint_dir={tmp / 'ckpt'}",
        "train.plot_every=0", f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", *args.override, *extra])


def _data(tmp: Path, args) -> None:
    from losslab.data.sources import run_generator

    run_generator("embedded_brats", str(tmp / "data"), seed=0, num_cases=args.cases, shape=(64, 64, 32))


def _fit_once(cfg, info) -> tuple[dict, dict]:
    """``(val, test)`` metrics of one training run (no MLflow): the epoch is chosen on the validation fold
    (``val/mean_dice``), and that checkpoint is scored on the held-out test patients, which neither
    training nor the choice saw."""
    from losslab.engine.checkpoint import evaluation_weights, load_checkpoint
    from losslab.engine.loop import fit, seed_everything
    from losslab.pipelines.scoring import split_metrics
    from losslab.tasks import task_of

    seed_everything(cfg.train.seed)
    task = task_of(cfg)
    loss_fn, model = task.build(cfg, info.channel_names, fractions=info.voxel_fractions(cfg.data.fold))
    step = task.step(cfg, loss_fn, info.channel_names)
    train, val = _fold_loaders(cfg, info, cfg.data.fold, seed=cfg.train.seed)
    fit(model, loss_fn, train, val, cfg.train, cfg.optim, step.metric_names, step=step)
    model.load_state_dict(evaluation_weights(load_checkpoint(Path(cfg.train.checkpoint_dir) / "best.pt")))
    test = task.test_loader(cfg, info)
    if test is None:
        raise SystemExit("the segmentation cache has no held-out test patients (data.test_fraction=0)")
    cpu = torch.device("cpu")
    return tuple(split_metrics(step, step.predict(model, loader, cpu, loss_fn), step.metric_names, loss_fn,
                               split) for split, loader in (("val", val), ("test", test)))


def _fold_loaders(cfg, info, fold: int, seed: int, batch_size: int | None = None):
    """The segmentation task's loaders of ``fold`` with the crops seeded by ``seed`` (the task seeds them
    with ``train.seed + fold``), ``batch_size`` cases a training batch (default ``data.batch_size``)."""
    from losslab.tasks import task_of

    data = cfg.data if batch_size is None else cfg.data.model_copy(update={"batch_size": batch_size})
    train = cfg.train.model_copy(update={"seed": seed - fold})
    return task_of(cfg).fold_loaders(cfg.model_copy(update={"data": data, "train": train}), info, fold)


def _fmt(values: list[float], digits: int) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def run_losses(args, tmp: Path) -> str:
    from losslab.data.cache import SegmentationEncoder, build_cache
    from losslab.data.splits import TEST_FOLD

    rows, info, by_seed = [], None, {}
    for loss in args.losses:
        val, test = [], []
        for seed in args.seeds:
            cfg = _config(loss, tmp, args, seed, f"train.checkpoint_dir={tmp / 'ckpt' / f'{loss}-{seed}'}")
            info = info or build_cache(cfg.data, encoder=SegmentationEncoder.from_config(cfg.seg))
            t0 = time.perf_counter()
            v, t = _fit_once(cfg, info)
            val.append(v)
            test.append(t)
            print(f"{loss} seed {seed}: mean Dice validation {v['val/mean_dice']:.4f}, test {t['test/mean_dice']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        cells = [_fmt([m[f"test/dice_{r}"] for m in test], 3) for r in REGIONS]
        cells.append(_fmt([m["test/mean_dice"] for m in test], 3))
        cells.append(", ".join(f"{m['test/mean_dice']:.2f}" for m in test))
        cells += [_fmt([m[f"test/hd95_{r}"] for m in test], 1) for r in REGIONS]
        cells.append(_fmt([m["val/mean_dice"] for m in val], 3))
        rows.append((statistics.mean(m["test/mean_dice"] for m in test), loss, cells))
        by_seed[loss] = dict(zip(args.seeds, (m["test/mean_dice"] for m in test)))
    rows.sort(key=lambda r: -r[0])
    cfg = _config(args.losses[0], tmp, args, 0)
    header = (f"Segmentation loss study (embedded BraTS-layout cohort, {args.cases} cases of 64 × 64 × 32 voxels: "
              f"{len(info.cases(0, train=True))} training and {len(info.cases(0, train=False))} validation volumes "
              f"(fold 0), {sum(r['fold'] == TEST_FOLD for r in info.index)} held-out test patients; "
              f"{cfg.model.backbone} {cfg.model.spatial_dims}D{f' {cfg.model.backbone_kwargs}' if cfg.model.backbone_kwargs else ''}, patches "
              f"{cfg.seg.patch_size} × {cfg.seg.samples_per_case} per case, {args.epochs} epochs, seeds "
              f"{', '.join(map(str, args.seeds))}, {args.study_threads} CPU thread(s)). The epoch is chosen by validation "
              f"mean Dice; Dice and HD95 are of that checkpoint on the test patients, mean ± std over seeds, "
              f"with each seed's test mean Dice and the validation mean Dice the choice was made on. Written by "
              f"`bench/seg_losses.py {_shown_arguments()}`.\n\n")
    table = ("| loss | Dice wt | Dice tc | Dice et | mean Dice | mean Dice by seed | HD95 wt (mm) | HD95 tc (mm) "
             "| HD95 et (mm) | validation mean Dice |\n")
    table += "|---|---|---|---|---|---|---|---|---|---|\n"
    table += "".join(f"| {loss} | " + " | ".join(cells) + " |\n" for _, loss, cells in rows)
    return header + table + "\n" + paired_section(by_seed, REFERENCE)


REFERENCE = "dice_ce"  # MONAI's DiceCELoss: the usual default every other loss is measured against


def paired_table(by_seed: dict[str, dict[int, float]], reference: str):
    """Each loss against ``reference`` in test mean Dice, paired by seed
    (:func:`losslab.stats.paired_comparisons`, Holm over the pairs). Every seed trains on the same
    cases and is scored on the same test patients, so ``test_train_ratio`` is 0: the plain paired
    t-test, with its ``mde`` and ``n_needed``."""
    import pandas as pd

    from losslab.stats import paired_comparisons

    values = pd.DataFrame([{"group": loss, "block": seed, "value": value, "test_train_ratio": 0.0}
                           for loss, seeds in by_seed.items() for seed, value in seeds.items()])
    order = [reference, *[loss for loss in by_seed if loss != reference]]
    table = paired_comparisons(values, "test/mean_dice", groups=order, reference=reference)
    return table[table["test"] == "nadeau_bengio_t"]


def paired_section(by_seed: dict[str, dict[int, float]], reference: str) -> str:
    """The paired table in markdown, with the design it ran under (a fixed number of seeds)."""
    from losslab.stats import n_needed_text

    if reference not in by_seed or len(by_seed) < 2:
        return ""
    seeds = len(by_seed[reference])
    lines = [f"Paired against {reference} (test mean Dice, blocks = seeds; plain paired t-test, the test patients "
             f"being the same for every seed; Holm over these pairs). Budget: a fixed design of {seeds} seeds, one look. "
             "MDE: the smallest difference these seeds detect with power 0.8 at two-sided 0.05 (one comparison, "
             "before the Holm step); pairs needed: the seeds that would detect the observed difference.", "",
             "| comparison | pairs | mean difference | 95 % CI | p (Holm) | verdict | MDE | pairs needed |",
             "|---|---:|---:|---|---:|---|---:|---:|"]
    for r in paired_table(by_seed, reference).itertuples():
        ci = "—" if r.ci_low != r.ci_low else f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}]"
        p = "—" if r.p_holm != r.p_holm else f"{r.p_holm:.3g}"
        mde = "—" if r.mde != r.mde else f"{r.mde:.3f}"
        lines.append(f"| {r.group_a} − {r.group_b} | {r.n_pairs} | {r.mean_diff:+.3f} | {ci} | {p} | {r.verdict} | "
                     f"{mde} | {n_needed_text(r.n_needed, r.verdict)} |")
    return "\n".join(lines) + "\n"


def _shown_arguments() -> str:
    """The command line without this machine's paths (``--workdir``, ``--results``)."""
    shown, args = [], iter(sys.argv[1:])
    for arg in args:
        if arg in ("--workdir", "--results"):
            next(args, None)  # and its value
        elif not arg.startswith(("--workdir=", "--results=")):
            shown.append(arg)
    return " ".join(shown)


def write_results(section: str, path: Path) -> None:
    """Replace (or append) the text between the seg_losses markers of ``path``."""
    text = path.read_text() if path.is_file() else "# Results\n"
    block = f"{START}\n## Segmentation losses\n\n{section}{END}"
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ----------------------------------------------------------------------------------------- speed
def _bare_epoch(model, loss_fn, loader, optimizer, grad_clip: float) -> None:
    model.train()
    for batch in loader:
        logits = model(batch["image"])
        loss = loss_fn(logits, batch["label"], dist_maps=batch["dist"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()


def _direct_validation(model, loader, roi, sw_batch_size: int, overlap: float) -> float:
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric

    model.eval()
    dice = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=True)
    with torch.no_grad():
        for batch in loader:
            logits = sliding_window_inference(batch["image"], roi, sw_batch_size, model, overlap=overlap)
            dice((torch.sigmoid(logits) > 0.5).float(), batch["label"])
    return float(dice.aggregate().mean())


def _epoch_times(args, cfg, info) -> tuple[float, float]:
    from losslab.engine.loop import FitState, _prepare, _train_epoch, build_optimizer, seed_everything
    from losslab.tasks import task_of

    times = {"losslab": [], "bare": []}
    for repeat in range(-1, args.repeats):  # epoch -1 warms both up and is not timed
        for variant in (("losslab", "bare") if repeat % 2 == 0 else ("bare", "losslab")):
            seed_everything(0)
            loss_fn, model = task_of(cfg).build(cfg, info.channel_names, fractions=info.voxel_fractions(0))
            step = task_of(cfg).step(cfg, loss_fn, info.channel_names)
            train, _ = _fold_loaders(cfg, info, 0, seed=0)
            if variant == "bare":
                optimizer = build_optimizer(model, loss_fn, cfg.optim)
                t0 = time.perf_counter()
                _bare_epoch(model, loss_fn, train, optimizer, cfg.train.grad_clip)
            else:
                run = _prepare(model, loss_fn, train, cfg.train, cfg.optim, step, [])
                run.train_model = model
                t0 = time.perf_counter()
                _train_epoch(run, FitState(run=run), 0)
            if repeat >= 0:
                times[variant].append(time.perf_counter() - t0)
    return statistics.median(times["losslab"]), statistics.median(times["bare"])


def _validation_rates(args, cfg, info) -> tuple[float, float, float]:
    from losslab.engine.loop import seed_everything
    from losslab.tasks import task_of

    seed_everything(0)
    no_hd95 = cfg.model_copy(update={"seg": cfg.seg.model_copy(update={"hd95": False})})
    loss_fn, model = task_of(cfg).build(no_hd95, info.channel_names)
    task = task_of(cfg).step(no_hd95, loss_fn, info.channel_names)
    _, val = _fold_loaders(cfg, info, 0, seed=0, batch_size=1)
    n = len(val.dataset)
    rates = {"losslab": [], "direct": []}
    for repeat in range(-1, args.val_repeats):  # pass -1 warms both up (allocator, oneDNN) and is not timed
        for variant in (("losslab", "direct") if repeat % 2 == 0 else ("direct", "losslab")):
            t0 = time.perf_counter()
            if variant == "losslab":
                ours = task.validate(model, val, torch.device("cpu"))[0]["val/mean_dice"]
            else:
                direct = _direct_validation(model, val, cfg.seg.patch_size, cfg.seg.sw_batch_size, cfg.seg.overlap)
            if repeat >= 0:
                rates[variant].append(n / (time.perf_counter() - t0))
    if abs(ours - direct) > 1e-6:
        print(f"WARNING: the two validations disagree: mean Dice {ours:.6f} vs {direct:.6f}")
    return statistics.median(rates["losslab"]), statistics.median(rates["direct"]), ours


def _peak_memory(args, tmp: Path) -> float:
    """Max RSS (GiB) of `losslab train` on the embedded cohort in a child process (``--threads``)."""
    overrides = [f"data.root={tmp / 'data'}", f"data.cache_dir={tmp / 'cache'}", "data.salt=bench",
                 "train.epochs=2", "train.device=cpu", f"train.checkpoint_dir={tmp / 'ckpt'}",
                 f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", *args.override]
    cmd = [sys.executable, "-c", f"import torch; torch.set_num_threads({args.threads}); from losslab.cli import run; run()",
           "train", "-c", str(REPO / "configs" / "experiment" / "seg_compound_learnable.yaml")]
    for o in overrides:
        cmd += ["-o", o]
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux


def run_speed(args, tmp: Path) -> None:
    from losslab.data.cache import SegmentationEncoder, build_cache

    cfg = _config("compound", tmp, args, 0)
    info = build_cache(cfg.data, encoder=SegmentationEncoder.from_config(cfg.seg))
    ours, bare = _epoch_times(args, cfg, info)
    print(f"training epoch: losslab {ours:.2f} s, bare MONAI loop {bare:.2f} s, ratio {ours / bare:.3f} (bar <= 1.05)")
    for loss in ("compound", "dice"):  # losslab also computes val/loss on whole volumes: the loss's cost shows
        ours_rate, direct_rate, dice = _validation_rates(args, _config(loss, tmp, args, 0), info)
        print(f"validation ({loss} val/loss): losslab {ours_rate:.2f} volumes/s, direct sliding_window_inference + "
              f"DiceMetric {direct_rate:.2f} volumes/s, ratio {ours_rate / direct_rate:.3f} (bar >= 0.95; "
              f"{1e3 / ours_rate - 1e3 / direct_rate:+.1f} ms per volume of {1e3 / direct_rate:.1f}; "
              f"same mean Dice {dice:.4f})")
    print(f"peak memory of the embedded run (2 epochs, {args.threads} thread(s)): {_peak_memory(args, tmp):.2f} GiB "
          "(bar < 4 GiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["losses", "speed", "all"], default="all")
    parser.add_argument("--losses", nargs="+", default=LOSSES, choices=LOSSES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--cases", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7, help="training epochs timed per variant")
    parser.add_argument("--val-repeats", type=int, default=9, help="validation passes timed per variant")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the speed part (run it on a quiet machine)")
    parser.add_argument("--study-threads", type=int, default=1, help="torch threads of the loss study")
    parser.add_argument("--override", "-o", action="append", default=[],
                        help="dotted config override applied to every run, e.g. -o seg.patch_size=[32,32,16]")
    parser.add_argument("--results", default=str(REPO / "docs" / "results.md"))
    parser.add_argument("--workdir", default=None, help="keep data and cache here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.workdir or scratch)
        if not (tmp / "data").is_dir():
            _data(tmp, args)
        if args.part in ("speed", "all"):
            torch.set_num_threads(args.threads)
            run_speed(args, tmp)
        if args.part in ("losses", "all"):
            torch.set_num_threads(args.study_threads)
            section = run_losses(args, tmp)
            print(section)
            write_results(section, Path(args.results))
            print(f"written to {args.results}")


if __name__ == "__main__":
    main()
