"""MLflow store set-up and managed runs: where runs go, how they end, what every run logs.

* :func:`setup_tracking` — tracking URI (config, else ``$MLFLOW_TRACKING_URI``, else
  ``sqlite:///mlflow.db``) and the experiment, with an explicit artifact root next to a SQLite store.
* :func:`managed_run` — a run that ends ``FAILED`` with the reason in the tag ``losslab.error`` when
  its body raises (Exception or KeyboardInterrupt), ``KILLED`` on Ctrl-C or SIGTERM; what it logged
  before stays.
* :func:`log_config`, :func:`log_metrics_batch`, :func:`log_figure`, :func:`log_table_artifacts` —
  what a run logs: the redacted config, metric batches, figures and tables.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from losslab.config import ExperimentConfig, dump_yaml, flatten
from losslab.redaction import redact_config, redact_text
from losslab.termination import Terminated

log = logging.getLogger(__name__)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MAX_PARAM_LENGTH = 6000


def resolve_tracking_uri(configured: str | None = None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """Next to a SQLite store: ``<store dir>/mlartifacts/<experiment>`` (never the cwd's ./mlruns)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).resolve()
        return (db.parent / "mlartifacts" / experiment).as_uri()
    return None  # a server assigns its own artifact root


def local_store_path(uri: str) -> Path | None:
    """The file or folder of a local store (``sqlite:///x.db``, ``file:///dir``, a bare path), else None."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" not in uri and not uri.startswith(("databricks", "sqlite:")):
        return Path(uri)
    return None


def prepare_store(uri: str) -> None:
    """Before MLflow touches a local store: warn, naming it, when its folder does not exist (MLflow
    would silently create a new, empty store there: usually a mistyped URI); and create or migrate a
    SQLite store's schema once, under a file lock (``<db>.lock``), so that workers starting together
    on a fresh store do not race on MLflow's schema migration."""
    path = local_store_path(uri)
    if path is None:
        return
    folder = path.parent if uri.startswith("sqlite:") else path
    if not folder.exists():
        warnings.warn(f"tracking store {uri}: folder {folder.resolve()} does not exist; MLflow creates a new, "
                      "empty store there (check MLFLOW_TRACKING_URI / tracking.tracking_uri)", stacklevel=3)
        log.warning("new MLflow store in a folder that did not exist: %s", folder.resolve())
    if not uri.startswith("sqlite:///"):
        return
    from filelock import FileLock

    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock", timeout=600):
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # the tracking store: creates or migrates the tables
        client.search_registered_models(max_results=1)  # the model registry on the same database


def setup_tracking(tracking_cfg) -> str:
    """Point MLflow at the configured store (prepared by :func:`prepare_store`) and experiment;
    return the experiment id."""
    uri = resolve_tracking_uri(tracking_cfg.tracking_uri)
    prepare_store(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name(tracking_cfg.experiment)
    if exp is None:
        location = tracking_cfg.artifact_location or default_artifact_location(uri, tracking_cfg.experiment)
        try:
            exp_id = client.create_experiment(tracking_cfg.experiment, artifact_location=location)
        except mlflow.exceptions.MlflowException:
            # another worker created it between our lookup and create: read it back
            exp = client.get_experiment_by_name(tracking_cfg.experiment)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


ERROR_TAGS = ("losslab.error", "losslab.traceback")  # written by managed_run when a run fails or is killed


def clear_error_tags(run_id: str) -> None:
    """Remove the tags of an earlier failure (a resumed run, a pruned trial); absent tags are fine."""
    client = MlflowClient()
    for key in ERROR_TAGS:
        with contextlib.suppress(Exception):
            client.delete_tag(run_id, key)


@contextlib.contextmanager
def managed_run(run_name: str | None = None, tags: dict[str, str] | None = None, nested: bool = False,
                run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume, with ``run_id``) a run; end it FAILED with the reason on any error, KILLED
    on Ctrl-C or SIGTERM (:class:`losslab.termination.Terminated`)."""
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=tags, nested=nested)
    try:
        yield run
    except BaseException as exc:
        reason = redact_text(f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(Exception):
            client = MlflowClient()
            client.set_tag(run.info.run_id, "losslab.error", reason[:5000])
            client.set_tag(run.info.run_id, "losslab.traceback", redact_text(traceback.format_exc())[-5000:])
        mlflow.end_run(status="KILLED" if isinstance(exc, (KeyboardInterrupt, Terminated)) else "FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


def config_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The resolved config flattened to ``{dotted key: text}`` exactly as :func:`log_config` logs it,
    secrets redacted (URL passwords, ``data.salt``; see :mod:`losslab.redaction`)."""
    params = {}
    for key, value in flatten(redact_config(cfg.to_dict())).items():
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        params[key] = text[:MAX_PARAM_LENGTH]
    return params


def log_config(cfg: ExperimentConfig) -> None:
    """The resolved config: flattened as params and whole as ``config.yaml``, secrets redacted."""
    params = config_params(cfg)
    client = MlflowClient()
    run_id = mlflow.active_run().info.run_id
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 90):
        client.log_batch(run_id, params=items[i : i + 90])
    mlflow.log_text(dump_yaml(cfg, redact=True), "config.yaml")


def log_metrics_batch(run_id: str, metrics: dict[str, float], step: int, synchronous: bool = True) -> None:
    """One ``log_batch`` call for a dict of metrics (NaN kept as NaN: missing, not 0)."""
    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if v is not None]
    client = MlflowClient()
    for i in range(0, len(items), 900):
        client.log_batch(run_id, metrics=items[i : i + 900], synchronous=synchronous)


def log_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(fig, path)
    plt.close(fig)


def log_table_artifacts(df, stem: str) -> None:
    """A pandas table as CSV and markdown artifacts."""
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / f"{stem}.csv"
        md_path = Path(tmp) / f"{stem}.md"
        df.to_csv(csv_path, index=False)
        md_path.write_text(markdown_table(df))
        mlflow.log_artifact(str(csv_path))
        mlflow.log_artifact(str(md_path))


def markdown_table(df) -> str:
    """A pandas table as markdown (``tabulate`` installed), else as plain text."""
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return df.to_string(index=False)
    return df.to_markdown(index=False)
