"""Screenshot the MLflow UI comparing losses (for the README), with headless Chromium.

    .venv/bin/python scripts/screenshot_mlflow_ui.py                      # tiny real runs in a temp store
    .venv/bin/python scripts/screenshot_mlflow_ui.py --store mlflow.db --experiment losslab-demo

Without ``--store`` it builds a small real experiment first: a tiny embedded BraTS cohort, 2-fold
cross-validation per loss (``ce``, ``focal``, ``balanced_softmax``) on timm's ``test_resnet``, one
``evaluate`` run per loss (for latency) and a ``compare`` run. Then it starts
``mlflow server --backend-store-uri sqlite:///...`` on 127.0.0.1, opens the UI's run comparison of the
fold runs (``#/compare-runs``) in headless Chromium (Debian's ``chromium``; never needed by the tests),
stops the server with SIGTERM and writes ``docs/mlflow_compare_losses.png`` (palette-quantised to stay
small). Needs: ``apt-get install -y chromium``.

``--view study`` shows a study's parent run instead (``docs/mlflow_study.png``): without ``--store`` it first
runs a real small study with ``losslab study`` (the demo study file, ``configs/study/demo.yaml``, with one
variant per ``--losses`` entry and the ``--metrics`` and ``-o`` overrides; one worker; the same command again reuses ``--workdir``'s cells), then opens the parent run's page
(Overview: ``study.md`` as its description and the plots below it); ``--view study-artifacts`` opens its
artifacts with ``plots/study_<metric>.png`` selected::

    nice -n 10 .venv/bin/python scripts/screenshot_mlflow_ui.py --view study -o train.epochs=2
    .venv/bin/python scripts/screenshot_mlflow_ui.py --view study --store mlflow.db --study demo
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOSSES = ("ce", "focal", "balanced_softmax")


def populate(store: Path, experiment: str, work: Path) -> None:
    """Real (tiny) runs: 2-fold CV per loss, an evaluate run per loss, then a compare run."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    os.environ.setdefault("LOSSLAB_CONFIG_ROOT", str(REPO / "configs"))
    from losslab.config import load_config
    from losslab.data.cache import build_cache
    from losslab.pipelines.compare import run_compare
    from losslab.pipelines.evaluate import run_evaluate
    from losslab.pipelines.train import run_train

    base = [
        f"data.root={work / 'embedded_brats'}", f"data.cache_dir={work / 'cache'}", "data.num_folds=2",
        "data.generate=embedded_brats", "data.generator_kwargs={num_cases: 40, shape: [48, 48, 16]}",
        "data.salt=screenshot", "data.bag_size=4",
        "model.backbone=test_resnet", "model.head_kwargs={hidden_dim: 16}", "train.epochs=3",
        f"train.checkpoint_dir={work / 'ckpt'}", f"tracking.experiment={experiment}", "optim.lr=0.003",
        "cv.folds=2", "tracking.registered_model_name=screenshot-mil",
    ]
    info = build_cache(load_config(None, base).data)
    for loss in LOSSES:
        cfg = load_config(None, base + [f"loss.name={loss}"])
        result = run_train(cfg, info=info)
        best = result.folds[0]
        run_evaluate(cfg.model_copy(update={"evaluate": {"split": "val", "fold": best.fold, "tta": {"passes": 1}}}),
                     source=best.run_id)
    print(run_compare(experiment).markdown())


def populate_study(store: Path, work: Path, losses: list[str], metrics: list[str], overrides: list[str]) -> str:
    """A real small study: the demo study file with one variant per loss and ``metrics`` (the first decides),
    run by ``losslab study`` in ``work`` (run again, it reuses the finished cells there)."""
    import yaml

    spec = yaml.safe_load((REPO / "configs" / "study" / "demo.yaml").read_text())
    spec |= {"config": str(REPO / spec["config"]), "variants": {loss: [f"loss={loss}"] for loss in losses},
             "reference": losses[0], "metrics": metrics}
    study_file = work / "study.yaml"
    study_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{store}", "LOSSLAB_CONFIG_ROOT": str(REPO / "configs")}
    command = [str(Path(sys.executable).with_name("losslab")), "study", "-c", str(study_file), "--workers", "1",
               "--no-progress", *[part for override in overrides for part in ("-o", override)]]
    subprocess.run(command, cwd=work, env=env, check=True)
    return spec["name"]


def study_parent(store: Path, study: str) -> tuple[str, str, list[str]]:
    """The study's parent run (the newest one tagged as its parent): experiment id, run id, its plots."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    query = f"tags.`losslab.study` = '{study}' and tags.`losslab.study_role` = 'parent'"
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, query, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise SystemExit(f"no parent run of study {study!r} in {store}")
    run = runs[0]
    plots = [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    return run.info.experiment_id, run.info.run_id, plots


def fold_run_ids(store: Path, experiment: str) -> tuple[str, list[str]]:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{store}")
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"experiment {experiment!r} not found in {store}")
    runs = mlflow.search_runs([exp.experiment_id], filter_string="tags.`losslab.entry_point` = 'train' "
                              "and attributes.status = 'FINISHED'")
    runs = runs[runs["tags.losslab.fold"].fillna("").str.fullmatch(r"-?\d+")].sort_values(["tags.losslab.loss", "tags.losslab.fold"])
    return exp.experiment_id, runs["run_id"].tolist()[:12]


def wait_healthy(url: str, timeout: float = 180.0) -> None:  # 60 s was too short on a loaded 2-core VM
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"mlflow server at {url} did not answer /health within {timeout:.0f} s")


def screenshot(url: str, out: Path, width: int, height: int, budget_ms: int, profile_dir: Path | None = None) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get update && apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="chromium-") as tmp:
        profile = profile_dir or tmp
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}"]
        # a first load without virtual time fills the profile's cache with the UI's scripts: from a cold cache
        # the run page's virtual time may never run out (on a loaded VM Chromium still waited after 180 s:
        # then pass --chromium-profile, a folder kept between calls, and run again)
        for timing in ([], [f"--virtual-time-budget={budget_ms}"]):
            subprocess.run(cmd + timing + [f"--screenshot={out}", url], check=True, timeout=180,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def shrink(path: Path, max_bytes: int = 500_000) -> None:
    from PIL import Image

    image = Image.open(path).convert("RGB")
    for colors in (256, 128, 64):
        image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        if path.stat().st_size < max_bytes:
            return


def page_url(args: argparse.Namespace, store: Path, base: str) -> tuple[str, str]:
    """The UI page to open, and what it shows (for the last line printed)."""
    if args.view.startswith("study"):
        experiment_id, run_id, plots = study_parent(store, args.study)
        url = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
        if args.view == "study-artifacts":
            shown = [p for p in plots if p.startswith("plots/study_")][:1]
            url += "/artifacts" + (f"/{shown[0]}" if shown else "")
        return url, f"the parent run of study {args.study!r} ({len(plots)} plots)"
    experiment_id, run_ids = fold_run_ids(store, args.experiment)
    if not run_ids:
        raise SystemExit(f"no finished fold runs in experiment {args.experiment!r}")
    if args.view == "compare":
        query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id])})
        return f"{base}/#/compare-runs?{query}", f"{len(run_ids)} fold runs"
    query = urllib.parse.urlencode({"searchFilter": "tags.`losslab.entry_point` = 'train' and tags.`mlflow.parentRunId` LIKE '%'",
                                    "compareRunsMode": "CHART"})
    return f"{base}/#/experiments/{experiment_id}/runs?{query}", f"{len(run_ids)} fold runs"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="an existing SQLite store (default: build a small one)")
    parser.add_argument("--workdir", type=Path, help="keep the built store and data here (reused when present)")
    parser.add_argument("--view", choices=("compare", "chart", "study", "study-artifacts"), default="compare",
                        help="compare: the run comparison page; chart: the experiment's chart view of fold runs; "
                             "study: a study's parent run (Overview); study-artifacts: its artifacts, plot selected")
    parser.add_argument("--experiment", default="losslab-screenshot")
    parser.add_argument("--study", default="demo", help="the study whose parent run --view study shows")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), help="the built study's variants (one loss each)")
    parser.add_argument("--metrics", nargs="+", default=["auc", "balanced_accuracy"],
                        help="the built study's metrics, the first decides (a few smoke-sized epochs leave "
                             "balanced accuracy at 0.5 in every cell; AUC still spreads)")
    parser.add_argument("-o", "--override", action="append", default=[], help="an override for the built study")
    parser.add_argument("--out", type=Path, help="default: docs/mlflow_compare_losses.png, or docs/mlflow_study.png")
    parser.add_argument("--port", type=int, default=5077)
    parser.add_argument("--chromium-profile", type=Path, help="Chromium's profile folder, kept (its cache warm) between calls")
    parser.add_argument("--size", default="1600,1000", help="window width,height")
    parser.add_argument("--budget-ms", type=int, help="virtual time for the UI's JavaScript (default 20000; 6000 for "
                        "the study views: at 20000 Chromium never finished the run page within 180 s)")
    args = parser.parse_args()
    if args.budget_ms is None:
        args.budget_ms = 6000 if args.view.startswith("study") else 20000
    if args.out is None:
        args.out = REPO / "docs" / ("mlflow_study.png" if args.view.startswith("study") else "mlflow_compare_losses.png")
    return args


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="losslab-shot-") as tmp:
        work = args.workdir.resolve() if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        store = args.store.resolve() if args.store else work / "mlflow.db"
        if args.store is None and args.view.startswith("study"):
            args.study = populate_study(store, work, args.losses, args.metrics, args.override)
        elif args.store is None and not store.exists():
            populate(store, args.experiment, work)
        artifacts = store.parent / "mlartifacts"
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{store}",
             "--default-artifact-root", artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(args.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{args.port}"
            url, shown = page_url(args, store, base)
            wait_healthy(base)
            width, height = (int(v) for v in args.size.split(","))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            screenshot(url, args.out, width, height, args.budget_ms, args.chromium_profile)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        shrink(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB) from {shown}")

if __name__ == "__main__":
    main()
