"""notebooks/compare_losses.ipynb runs top to bottom (nbclient) against a small experiment in the
session's SQLite store, on a kernel that is this interpreter (the venv's python)."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import mlflow
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "compare_losses.ipynb"


def _kernel_spec(root: Path) -> str:
    """A kernel spec whose argv is ``sys.executable``: the notebook sees the same losslab and mlflow
    as the tests, whatever ``python`` on PATH is (ipykernel's own spec says just ``python``)."""
    name = "losslab-test-venv"
    spec = root / "kernels" / name
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "losslab tests", "language": "python"}))
    return name


def test_notebook_executes_against_a_small_experiment(mlflow_store, tmp_path, monkeypatch):
    experiment = f"notebook-{uuid.uuid4().hex[:8]}"
    mlflow.set_experiment(experiment)
    # three losses on three folds; val/balanced_accuracy per epoch = best - 0.1 * (2 - epoch)
    values = {"ce": [0.55, 0.65, 0.60], "focal": [0.70, 0.80, 0.75], "ldam": [0.56, 0.64, 0.61]}
    for loss, folds in values.items():
        for fold, bal in enumerate(folds):
            tags = {"losslab.entry_point": "train", "losslab.loss": loss, "losslab.fold": str(fold),
                    "losslab.class_names": "LGG,HGG"}
            with mlflow.start_run(run_name=f"{loss}-f{fold}", tags=tags):
                mlflow.log_params({"data.n_train": "20", "data.n_val": "10", "train.epochs": "3"})
                for epoch in range(3):
                    mlflow.log_metric("val/balanced_accuracy", bal - 0.1 * (2 - epoch), step=epoch)
                mlflow.log_metrics({"best_val/balanced_accuracy": bal, "best_val/auc": bal + 0.1,
                                    "best_val/recall_LGG": bal - 0.1, "best_val/recall_HGG": bal + 0.1,
                                    "best_val/min_class_recall": bal - 0.1, "best_val/dead_class_count": 0.0})
    with mlflow.start_run(run_name="focal-f0", tags={"losslab.entry_point": "train", "losslab.loss": "focal",
                                                     "losslab.fold": "0"}) as failed:
        mlflow.log_params({"data.n_train": "20", "data.n_val": "10", "train.epochs": "3"})
        mlflow.log_metric("val/balanced_accuracy", 0.01, step=0)
    mlflow.tracking.MlflowClient().set_terminated(failed.info.run_id, "FAILED")

    kernel_name = _kernel_spec(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("LOSSLAB_EXPERIMENT", experiment)
    monkeypatch.setenv("LOSSLAB_METRICS", "balanced_accuracy f1_macro")  # f1_macro was never logged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    monkeypatch.setenv("MPLBACKEND", "Agg")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print('kernel python:', sys.executable)"))
    NotebookClient(nb, kernel_name=kernel_name, timeout=120, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
                   ).execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    markdown = "\n".join(o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {}))
    assert f"9 fold runs in experiment '{experiment}', grouped by losslab.loss; 0 not pooled" in text
    assert failed.info.run_id not in text + markdown  # the FAILED run is left out everywhere
    assert "0.750 ± 0.050" in markdown and "0.600 ± 0.050" in markdown  # focal, ce balanced accuracy
    assert "—" in markdown  # f1_macro missing, not 0
    # per-epoch curves: focal's mean at epoch 0 is 0.75 - 0.2
    curve_table = text[text.index("mean val/balanced_accuracy per epoch:"):]
    focal_line = next(line for line in curve_table.splitlines() if line.startswith("focal"))
    assert [float(v) for v in focal_line.split()[1:]] == pytest.approx([0.55, 0.65, 0.75])
    # paired statistics: focal better than ce by 0.15 on every fold; Nadeau-Bengio p by hand
    import math

    from scipy import stats as sps

    assert "focal better" in markdown  # 0.15 on every fold: no spread, p = 0
    diffs = [a - b for a, b in zip(values["ce"], values["ldam"])]
    mean = sum(diffs) / 3
    var = sum((x - mean) ** 2 for x in diffs) / 2
    t = mean / math.sqrt((1 / 3 + 10 / 20) * var)
    assert f"{2 * sps.t.sf(abs(t), 2):.3g}" in markdown and "no detectable difference" in markdown
    assert "balanced_accuracy: average ranks (1 = best) focal 1.00" in text
    assert "plots/critical_difference_balanced_accuracy.png" in text and "curves: val/balanced_accuracy" in text
    assert "plots/metric_bars_balanced_accuracy.png" in text and "plots/recall_heatmap.png" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 5  # two metric bar charts, the heat map, the CD diagram and the curves
    assert f"kernel python: {sys.executable}" in text  # the venv's interpreter, not whatever is on PATH


def test_notebook_has_a_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and "LOSSLAB_EXPERIMENT" in params[0].source and "MLFLOW_TRACKING_URI" in params[0].source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed without outputs
