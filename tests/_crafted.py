"""A crafted registered model in ``mlflow.pytorch`` pickle format whose unpickling creates a file:
what an attacker with write access to a registry could publish. Shared by the evaluate and distill
safety tests."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient


class _CreatesFile:
    """Unpickling this calls ``open(marker, "w")``: the file appears iff the pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def register_pickle_bomb(name: str, marker: Path, config_yaml: str | None = None) -> str:
    """Register ``name`` (alias ``candidate``) as a pickle-format ``mlflow.pytorch`` model whose
    ``data/model.pth`` creates ``marker`` when loaded; return ``models:/name@candidate``."""
    import mlflow.pytorch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        mlflow.pytorch.save_model(torch.nn.Linear(2, 2), str(folder), serialization_format="pickle",
                                  pip_requirements=["torch"])
        torch.save(_CreatesFile(marker), folder / "data" / "model.pth")
        with mlflow.start_run(run_name="crafted") as run:
            mlflow.log_artifacts(str(folder), "model")
            if config_yaml is not None:
                mlflow.log_text(config_yaml, "config.yaml")
        mv = mlflow.register_model(f"runs:/{run.info.run_id}/model", name)
    MlflowClient().set_registered_model_alias(name, "candidate", f"{mv.version}")
    assert not marker.exists()
    return f"models:/{name}@candidate"
