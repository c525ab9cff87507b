"""Every metric of a tiny ``distill``, to 6 decimals: a before/after check for refactors of the distill path.

Settings (the embedded MedPix-like data, generated into a temporary folder; fixed salt and seeds; a
temporary SQLite MLflow store):

* ``medpix``: configs/experiment/distill_medpix.yaml with tiny models: the teacher and two students
  (``vanilla`` with T=2 and ``crd``), 2 epochs each, a held-out test split.
* ``seed``: configs/experiment/distill_seed.yaml (AdamW, cosine with a warm-up epoch) on the same data
  with tiny models: the teacher, ``rkd`` and the student alone.
* ``study``: the distillation study of scripts/reproduce_cohorts.py (``--study distillation``): the
  teacher on every label, ``vanilla`` and the student alone on a tenth of the labels.

For every run (teacher, then each student, named by ``losslab.loss``) it prints each metric's whole
history (``key step value``) and the data sizes the parent logged; timings (``latency/*``) are left
out (and ``train/epoch_time_s``), since they differ from one machine, or one minute, to the next. Diff two outputs to check that a
change moved no number::

    python bench/distill_snapshot.py > before.txt   # ... change the code ...
    python bench/distill_snapshot.py > after.txt && diff before.txt after.txt
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_TEACHER = ("{image: {backbone: test_vit, kwargs: {img_size: 32, patch_size: 8}}, "
                "text: {name: small_transformer, dim: 32, depth: 1, max_length: 24}, fusion: cross_attention, "
                "fusion_dim: 32, fusion_layers: 1}")
TINY_STUDENT = ("{image: {backbone: test_vit, kwargs: {img_size: 32, patch_size: 8}}, "
                "text: {name: small_transformer, dim: 16, depth: 1, max_length: 24}, fusion: cross_attention, "
                "fusion_dim: 16, fusion_layers: 1}")
SETTINGS = {
    "medpix": ("configs/experiment/distill_medpix.yaml",
               ["distill.losses=[{name: vanilla, temperature: 2.0}, crd]", "distill.student_alone=false"]),
    "seed": ("configs/experiment/distill_seed.yaml",
             ["distill.losses=[rkd]", "distill.student_alone=true", "data.source_kwargs={image_size: 32}"]),
    "study": ("configs/experiment/distill_medpix.yaml",
              ["distill.losses=[vanilla]", "distill.student_alone=true", "distill.student_label_fraction=0.1"]),
}
LEFT_OUT = ("latency/", "train/epoch_time_s")  # timings


def setting_config(name: str, tmp: Path):
    from losslab.config import load_config

    path, extra = SETTINGS[name]
    return load_config(str(REPO / path), [
        f"data.root={tmp / 'raw'}", "data.generate=embedded_medpix", f"data.cache_dir={tmp / 'cache' / name}",
        "data.generator_kwargs={num_samples: 120, image_size: 32}", "data.num_folds=3", "data.test_fraction=0.2",
        "data.salt=bench-salt", "data.seed=0", "data.fold=0", "data.batch_size=16", "data.num_workers=0",
        "train.epochs=2", "train.seed=0", "train.device=cpu", f"train.checkpoint_dir={tmp / 'ckpt' / name}",
        "distill.teacher.epochs=2", "distill.student.epochs=2", f"distill.teacher.model={TINY_TEACHER}",
        f"distill.student.model={TINY_STUDENT}", "distill.teacher.registered_model_name=null",
        f"distill.cache_dir={tmp / 'teacher_outputs' / name}", f"tracking.experiment=bench-distill-{name}",
        "tracking.log_model=false", "tracking.registered_model_name=null", *extra])


def child_runs(client, parent_id: str) -> list:
    """The runs under the distill parent ``parent_id`` (any depth), teacher first, in start order."""
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], "", max_results=1000, order_by=["attributes.start_time ASC"])
    children, frontier = [], {parent_id}
    while frontier:
        found = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in frontier]
        children += found
        frontier = {r.info.run_id for r in found}
    return sorted(children, key=lambda r: (r.data.tags.get("losslab.loss") != "teacher", r.info.start_time))


def snapshot(name: str, tmp: Path) -> list[str]:
    from mlflow.tracking import MlflowClient

    from losslab.pipelines.distill import run_distill

    result = run_distill(setting_config(name, tmp))
    client = MlflowClient()
    params = client.get_run(result.parent_run_id).data.params
    lines = [f"[{name}] parent " + " ".join(f"{k}={params[k]}" for k in sorted(params)
                                             if k.startswith(("data.n_", "distill.task_classes")))]
    for run in child_runs(client, result.parent_run_id):
        label = run.data.tags.get("losslab.loss", "?")
        n_cases = run.data.params.get("data.n_train_cases", run.data.params.get("data.n_train", "?"))
        lines.append(f"[{name}] run {label} training cases {n_cases}")
        for key in sorted(run.data.metrics):
            if key.startswith(LEFT_OUT):
                continue
            for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp)):
                lines.append(f"[{name}] {label} {key} {m.step} {m.value:.6f}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="distill_snapshot_") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        for name in args.setting:
            print("\n".join(snapshot(name, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
