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


def wait_healthy(url: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"mlflow server at {url} did not answer /health within {timeout:.0f} s")


def screenshot(url: str, out: Path, width: int, height: int, budget_ms: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get update && apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url]
        subprocess.run(cmd, check=True, timeout=180, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def shrink(path: Path, max_bytes: int = 500_000) -> None:
    from PIL import Image

    image = Image.open(path).convert("RGB")
    for colors in (256, 128, 64):
        image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        if path.stat().st_size < max_bytes:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="an existing SQLite store (default: build a small one)")
    parser.add_argument("--workdir", type=Path, help="keep the built store and data here (reused when present)")
    parser.add_argument("--view", choices=("compare", "chart"), default="compare",
                        help="compare: the run comparison page; chart: the experiment's chart view of fold runs")
    parser.add_argument("--experiment", default="losslab-screenshot")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "mlflow_compare_losses.png")
    parser.add_argument("--port", type=int, default=5077)
    parser.add_argument("--size", default="1600,1000", help="window width,height")
    parser.add_argument("--budget-ms", type=int, default=20000, help="virtual time for the UI's JavaScript")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="losslab-shot-") as tmp:
        work = args.workdir.resolve() if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        store = args.store.resolve() if args.store else work / "mlflow.db"
        if args.store is None and not store.exists():
            populate(store, args.experiment, work)
        experiment_id, run_ids = fold_run_ids(store, args.experiment)
        if not run_ids:
            raise SystemExit(f"no finished fold runs in experiment {args.experiment!r}")
        artifacts = store.parent / "mlartifacts"
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{store}",
             "--default-artifact-root", artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(args.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{args.port}"
            wait_healthy(base)
            if args.view == "compare":
                query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id])})
                url = f"{base}/#/compare-runs?{query}"
            else:
                query = urllib.parse.urlencode({"searchFilter": "tags.`losslab.entry_point` = 'train' and tags.`mlflow.parentRunId` LIKE '%'",
                                                "compareRunsMode": "CHART"})
                url = f"{base}/#/experiments/{experiment_id}/runs?{query}"
            width, height = (int(v) for v in args.size.split(","))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            screenshot(url, args.out, width, height, args.budget_ms)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        shrink(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB) from {len(run_ids)} fold runs")


if __name__ == "__main__":
    main()
