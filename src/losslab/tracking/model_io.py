"""Models in and out of MLflow: the safe ``losslab`` flavor, registration with an alias, download.

:func:`log_and_register_model` logs the model in the ``losslab`` flavor (safetensors state dict +
a JSON spec, never pickle) with a signature, registers it and sets an alias (aliases, not stages);
:func:`download_model` fetches such a folder and names its format without loading anything
(:func:`losslab.pipelines.registry.load_registered_model` loads it back).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient


class UnsafeModelError(ValueError):
    """A registered model in a format whose loading can run code (pickle), refused without opt-in."""


class _LosslabFlavor:
    """The ``losslab`` MLflow flavor, in the shape ``mlflow.models.Model.log`` expects of a flavor
    module: ``save_model(path, mlflow_model, **kwargs)`` writes the model folder
    (:mod:`losslab.models.export`) and the ``MLmodel`` file. No pyfunc flavor: loading goes through
    :func:`losslab.pipelines.registry.load_registered_model`, never through code named by the artifact."""

    @staticmethod
    def save_model(path: str, mlflow_model, model, spec: dict[str, Any], signature=None, **_: Any) -> None:
        import importlib.metadata

        import torch

        from losslab.models.export import FLAVOR_NAME, FORMAT_VERSION, SPEC_FILE, WEIGHTS_FILE, save_model_dir

        save_model_dir(model, path, spec)
        try:
            version = importlib.metadata.version("losslab")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        mlflow_model.add_flavor(FLAVOR_NAME, format=FORMAT_VERSION, weights=WEIGHTS_FILE, spec=SPEC_FILE,
                                kind=spec.get("kind"), losslab_version=version,
                                torch_version=torch.__version__.split("+")[0])
        if signature is not None:
            mlflow_model.signature = signature
        mlflow_model.save(str(Path(path) / "MLmodel"))


def log_and_register_model(model, input_example, registered_model_name: str | None, alias: str | None,
                           version_tags: dict[str, str] | None = None, name: str = "model",
                           spec: dict[str, Any] | None = None) -> Any:
    """Log ``model`` in the ``losslab`` flavor (its state dict as safetensors plus ``spec``, the JSON
    our code rebuilds it from; see :mod:`losslab.models.export`), register it, set ``alias`` on the new
    version and tag the version. Returns the ModelVersion, or None without a registered name.

    ``input_example`` (a numpy batch ``(B, N, C, H, W)``, optional) gives the signature
    ``x -> logits (B, K)`` of :class:`~losslab.models.export.LogitsOnly`. Nothing is pickled: loading
    cannot run code (the pickle format also fixed nothing the state dict does not; torch.export's
    ``pt2`` would fix the bag size at export time, while MIL bags vary in size).
    """
    import numpy as np
    import torch
    from mlflow.models import Model, infer_signature

    from losslab.models.export import FLAVOR_NAME, LogitsOnly

    if spec is None:
        raise ValueError("log_and_register_model needs the model's spec (how to rebuild it)")
    model = model.cpu().eval()
    signature = None
    if input_example is not None:
        with torch.no_grad():
            logits = LogitsOnly(model)(torch.as_tensor(input_example))
        signature = infer_signature(input_example, logits.numpy().astype(np.float32))
    info = Model.log(name=name, artifact_path=None, flavor=_LosslabFlavor, flavor_name=FLAVOR_NAME,
                     registered_model_name=registered_model_name, model=model, spec=spec, signature=signature)
    if not registered_model_name:
        return None
    client = MlflowClient()
    version = info.registered_model_version
    if version is None:
        versions = client.search_model_versions(f"name='{registered_model_name}' and run_id='{mlflow.active_run().info.run_id}'")
        version = max(int(v.version) for v in versions)
    if alias:
        client.set_registered_model_alias(registered_model_name, alias, f"{version}")
    for k, v in (version_tags or {}).items():
        client.set_model_version_tag(registered_model_name, f"{version}", k, str(v))
    return client.get_model_version(registered_model_name, f"{version}")


def download_model(model_uri: str, dst_path: str) -> tuple[Path, str]:
    """Download a logged/registered model's folder (nothing is loaded) and name its format:
    ``"losslab"`` (safe), ``"pickle"`` (an ``mlflow.pytorch`` pickle model: loading it runs code) or
    another flavor/format name (e.g. ``"pytorch:pt2"``)."""
    from mlflow.models import Model

    from losslab.models.export import FLAVOR_NAME

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst_path))
    flavors = Model.load(str(local)).flavors
    if FLAVOR_NAME in flavors:
        return local, FLAVOR_NAME
    if "pytorch" in flavors:
        fmt = flavors["pytorch"].get("serialization_format") or "pickle"  # older MLflow: always pickle
        return local, "pickle" if fmt == "pickle" else f"pytorch:{fmt}"
    return local, ",".join(sorted(flavors)) or "no flavor"
