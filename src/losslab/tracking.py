"""Everything that talks to MLflow: store set-up, managed runs, the engine callback, the registry.

* :func:`setup_tracking` — tracking URI (config, else ``$MLFLOW_TRACKING_URI``, else
  ``sqlite:///mlflow.db``) and the experiment, with an explicit artifact root next to a SQLite store.
* :func:`managed_run` — a run that ends ``FAILED`` with the reason in the tag ``losslab.error`` when
  its body raises (Exception or KeyboardInterrupt); what it logged before stays.
* :class:`MLflowCallback` — per-epoch metrics cast to float and sent in one ``log_batch`` per epoch,
  checkpoints as artifacts, alarms as tags. Tracking failures only warn, except under
  ``LOSSLAB_TRACKING_STRICT=1`` (set by the tests) where they raise.
* :func:`log_and_register_model` — the model in the ``losslab`` flavor (safetensors state dict +
  a JSON spec, never pickle) with a signature, registered with an alias (aliases, not stages);
  :func:`download_model` fetches such a folder and names its format without loading anything.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from losslab.config import ExperimentConfig, dump_yaml, flatten
from losslab.engine.callbacks import Callback
from losslab.redaction import redact_config, redact_text
from losslab.termination import Terminated

log = logging.getLogger(__name__)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
STRICT_ENV = "LOSSLAB_TRACKING_STRICT"
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


def setup_tracking(tracking_cfg: Any) -> str:
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


def _strict() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def _safe(fn):
    """Tracking problems must not kill a training run: warn (raise under the strict test flag)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if _strict():
                raise
            warnings.warn(f"MLflow tracking failed in {fn.__name__}: {exc}", stacklevel=2)
            return None

    return wrapper


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


class MLflowCallback(Callback):
    """Engine → MLflow: per-epoch metric batches, checkpoints, alarms and plots.

    Args:
        run_id: the run to log to (the pipeline owns and ends it).
        class_names: for the per-class plots.
        plot_every: log plots every this many epochs (and at the end); 0 = only at the end.
        log_checkpoints: upload ``best``/``last`` checkpoints under ``checkpoints/``.
        checkpoint_every: upload them every this many epochs (1 = every epoch); 0 = only when the fit
            ends or fails (the local ``last.pt`` is what ``--resume`` uses first). Uploading a large
            checkpoint every epoch is the main per-epoch cost of tracking.
        synchronous: False = MLflow's async logging for the per-epoch batches (flushed at the end).

    Every epoch where a class gets no validation prediction sets the tag
    ``losslab.zero_predictions.epoch_<k>`` to those classes (at once; the ``dead_class`` alarm
    waits for ``train.dead_class_patience`` epochs). On a resumed fit, epochs that are in the
    checkpoint's history but not in the run (killed between checkpoint and logging) are logged.
    """

    def __init__(self, run_id: str, class_names: list[str], plot_every: int = 0, log_checkpoints: bool = True,
                 synchronous: bool = True, checkpoint_every: int = 1) -> None:
        self.run_id = run_id
        self.class_names = class_names
        self.plot_every = plot_every
        self.log_checkpoints = log_checkpoints
        self.checkpoint_every = checkpoint_every
        self._pending: dict[str, str] = {}  # kind -> path written but not uploaded yet
        self._uploaded: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) when it was uploaded
        self.synchronous = synchronous
        self.client = MlflowClient()
        self.alarm_tags: dict[str, str] = {}

    @_safe
    def on_fit_start(self, state):
        best = Path(state.checkpoint_dir or ".") / "best.pt"
        if self.log_checkpoints and best.is_file():  # a resumed fit whose best epoch came before the kill
            self._pending["best"] = str(best)
        history = state.history
        n = max((len(v) for v in history.values()), default=0)
        if not n:
            return
        logged = {int(m.step) for m in self.client.get_metric_history(self.run_id, "train/loss")}
        for epoch in range(n):
            if epoch not in logged:
                log_metrics_batch(self.run_id, {k: v[epoch] for k, v in history.items() if len(v) == n}, epoch)

    @_safe
    def on_epoch_end(self, state, metrics):
        step = int(metrics.get("epoch", state.epoch))
        log_metrics_batch(self.run_id, {k: v for k, v in metrics.items() if k != "epoch"}, step,
                          synchronous=self.synchronous)
        from losslab.engine.metrics import dead_class_names, pred_counts

        zero = dead_class_names(pred_counts(metrics))
        if zero:
            self.client.set_tag(self.run_id, f"losslab.zero_predictions.epoch_{step}", ",".join(zero))
        if self.plot_every and (step + 1) % self.plot_every == 0:
            self._plots(state, final=False)

    @_safe
    def on_checkpoint(self, state, path, kind):
        if not self.log_checkpoints:
            return
        self._pending[kind] = str(path)
        if kind == "last" and self.checkpoint_every and (int(state.epoch) + 1) % self.checkpoint_every == 0:
            self._upload_checkpoints()

    def _upload_checkpoints(self) -> None:
        for kind in sorted(self._pending):  # best, then last
            path = Path(self._pending[kind])
            stat = path.stat()
            self.client.log_artifact(self.run_id, str(path), artifact_path="checkpoints")
            self._uploaded[str(path)] = (stat.st_size, stat.st_mtime_ns)
        self._pending.clear()

    def remove_uploaded_checkpoints(self) -> list[str]:
        """Delete the local checkpoint files this callback uploaded and that have not changed since
        (same size and modification time), then their folder if it is empty: the run's
        ``checkpoints/`` artifacts are the copies that stay. A file whose upload failed stays (with a
        warning). Returns the paths removed."""
        removed, folders = [], set()
        for path_text, (size, mtime) in list(self._uploaded.items()):
            path = Path(path_text)
            folders.add(path.parent)
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                if (stat.st_size, stat.st_mtime_ns) == (size, mtime):
                    path.unlink()
                    removed.append(path_text)
                    del self._uploaded[path_text]
        for folder in folders:
            kept = sorted(p.name for p in folder.glob("*.pt"))
            if kept:
                log.warning("checkpoint(s) %s of run %s not uploaded: kept in %s", ", ".join(kept), self.run_id, folder)
            with contextlib.suppress(OSError):
                folder.rmdir()
        return removed

    @_safe
    def on_alarm(self, state, alarm):
        self.client.set_tag(self.run_id, f"losslab.alarm.{alarm.name}", alarm.message[:5000])

    @_safe
    def on_fit_end(self, state):
        self._flush()
        self._upload_checkpoints()
        self._plots(state, final=True)

    @_safe
    def on_exception(self, state, exc):
        self._flush()
        self._upload_checkpoints()
        self.remove_uploaded_checkpoints()  # `--resume` downloads them again

    def _flush(self) -> None:
        if not self.synchronous:
            mlflow.flush_async_logging()

    def _plots(self, state, final: bool) -> None:
        from losslab import plots
        from losslab.engine.metrics import confusion_matrix

        hist = state.history
        curves = [k for k in ("train/loss", "val/loss", "val/balanced_accuracy", "val/min_class_recall",
                              "val/mean_balanced_accuracy", "val/mean_f1_macro") if k in hist]
        log_figure(plots.plot_curves(hist, curves), "plots/curves.png")
        log_figure(plots.plot_curves(hist, [k for k in ("train/loss", "val/loss") if k in hist]), "plots/loss_curves.png")
        if not self.class_names:  # one head per task (distill): the curves say it, per task
            return
        log_figure(plots.plot_per_class_recall(hist, self.class_names), "plots/per_class_recall.png")
        out = state.last_val_outputs
        if out is not None:
            y_pred = out["pred"] if "pred" in out else out["probs"].argmax(1)
            cm = confusion_matrix(out["labels"], y_pred, len(self.class_names))
            name = "plots/confusion_matrix.png" if final else f"plots/confusion_matrix_epoch_{state.epoch:03d}.png"
            log_figure(plots.plot_confusion_matrix(cm, self.class_names), name)
            if "attention" in out:
                attn = [a[m] for a, m in zip(out["attention"][:4], out["mask"][:4])]
                log_figure(plots.plot_attention(attn, [f"val bag {i} (label {self.class_names[int(l)]})"
                                                       for i, l in enumerate(out["labels"][:4])]),
                           "plots/attention.png")


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


def log_dict_artifact(data: dict, path: str) -> None:
    mlflow.log_dict(data, path)


def log_table_artifacts(df, stem: str) -> None:
    """A pandas table as CSV and markdown artifacts."""
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / f"{stem}.csv"
        md_path = Path(tmp) / f"{stem}.md"
        df.to_csv(csv_path, index=False)
        md_path.write_text(df.to_markdown(index=False) if _has_tabulate() else df.to_string(index=False))
        mlflow.log_artifact(str(csv_path))
        mlflow.log_artifact(str(md_path))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401

        return True
    except ImportError:
        return False


# ------------------------------------------------------------------------------------------- sweep
# One sweep (an Optuna study) = one parent run, shared by every worker on that study; one child run
# per trial (its sampled params, the metrics of every epoch, its state); the trial's train run(s)
# nest under the trial run. Trial states map to MLflow as:
#   COMPLETE -> FINISHED, tag losslab.trial_state=COMPLETE
#   PRUNED   -> KILLED,   tag losslab.trial_state=PRUNED (+ losslab.pruned_at_step); stopped on purpose,
#               not an error, so never FAILED — the fold run that the pruning exception ended FAILED
#               is set to KILLED the same way, and its losslab.error tag is removed
#   FAIL     -> FAILED,   tag losslab.trial_state=FAIL (+ losslab.error); also for a trial whose worker
#               died (failed by Optuna's heartbeat check in another worker)
# optuna-integration's MLflowCallback is deprecated (removal in Optuna 6), hence these helpers.
TRIAL_STATE_TAG = "losslab.trial_state"
SWEEP_ROLE_TAG = "losslab.sweep_role"  # parent | trial | fold
STUDY_TAG = "losslab.study"
TRIAL_NUMBER_TAG = "losslab.trial_number"
_TRIAL_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def mark_trial_run(run_id: str, trial_state: str, reason: str | None = None, step: int | None = None) -> None:
    """Set a run's MLflow status from an Optuna trial state (see the table above) and tag it."""
    client = MlflowClient()
    client.set_terminated(run_id, status=_TRIAL_STATUS[trial_state])
    client.set_tag(run_id, TRIAL_STATE_TAG, trial_state)
    if trial_state == "PRUNED":
        clear_error_tags(run_id)  # written by managed_run; pruning is no error
        if step is not None:
            client.set_tag(run_id, "losslab.pruned_at_step", str(step))
    elif reason:
        client.set_tag(run_id, "losslab.error", redact_text(reason)[:5000])


@contextlib.contextmanager
def trial_run(trial_number: int, study_name: str, params: dict[str, Any], tags: dict[str, str] | None = None,
              pruned: tuple[type[BaseException], ...] = ()) -> Iterator[mlflow.ActiveRun]:
    """A child run of the active (sweep parent) run for one trial: params logged, state on exit.

    ``pruned`` lists the exception types that mean "pruned" (``optuna.TrialPruned``): the run ends
    KILLED with ``losslab.trial_state=PRUNED``; any other exception ends it FAILED with the reason.
    """
    all_tags = {SWEEP_ROLE_TAG: "trial", STUDY_TAG: study_name, TRIAL_NUMBER_TAG: str(trial_number),
                TRIAL_STATE_TAG: "RUNNING", "losslab.entry_point": "sweep"} | (tags or {})
    run = mlflow.start_run(run_name=f"trial-{trial_number}", tags=all_tags, nested=True)
    run_id = run.info.run_id
    try:
        if params:
            mlflow.log_params({k: str(v)[:MAX_PARAM_LENGTH] for k, v in params.items()})
        yield run
    except BaseException as exc:
        mlflow.end_run(status="FAILED")
        with contextlib.suppress(Exception):
            if pruned and isinstance(exc, pruned):
                mark_trial_run(run_id, "PRUNED", step=getattr(exc, "step", None))
            else:
                mark_trial_run(run_id, "FAIL", reason=f"{type(exc).__name__}: {exc}")
        raise
    else:
        mlflow.end_run(status="FINISHED")
        MlflowClient().set_tag(run_id, TRIAL_STATE_TAG, "COMPLETE")


def find_trial_runs(study_name: str, trial_number: int | None = None, experiment_ids: list[str] | None = None) -> list:
    """The trial runs (role ``trial``) of a study, optionally one trial's, in every experiment given
    (default: all active experiments of the store)."""
    client = MlflowClient()
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.`{SWEEP_ROLE_TAG}` = 'trial' and tags.`{STUDY_TAG}` = '{study_name}'"
    if trial_number is not None:
        query += f" and tags.`{TRIAL_NUMBER_TAG}` = '{trial_number}'"
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def fail_dead_trial_runs(study_name: str, trial_number: int, reason: str) -> list[str]:
    """A trial whose worker died: end its trial run and the runs under it FAILED (if still RUNNING).
    Returns the run ids changed."""
    client = MlflowClient()
    changed = []
    for run in find_trial_runs(study_name, trial_number):
        children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        for r in [run, *children]:
            if r.info.status == "RUNNING":
                mark_trial_run(r.info.run_id, "FAIL", reason=reason)
                changed.append(r.info.run_id)
    return changed


def log_sweep_summary(run_id: str, study: Any, best_config_yaml: str | None) -> None:
    """On the sweep's parent run: best value (metric), best params (tags ``best.<key>`` and
    ``best_params.json``), ``best_config.yaml``, the trials table (``trials.csv``/``trials.md``) and
    Optuna's optimisation-history and parameter-importance plots under ``plots/``.
    Re-logged by every worker when it finishes, so the last one leaves the complete picture."""
    import optuna

    client = MlflowClient()
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    step = len(trials)
    metrics = {f"trials_{state.lower()}": float(n) for state, n in counts.items()}
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if complete:
            best = study.best_trial
            metrics.update({"best_value": float(best.value), "best_trial": float(best.number)})
            for key, value in best.params.items():
                client.set_tag(run_id, f"best.{key}", str(value)[:5000])
            (tmp_path / "best_params.json").write_text(json.dumps(
                {"trial": best.number, "value": best.value, "params": best.params,
                 "overrides": best.user_attrs.get("overrides", [])}, indent=2, default=str))
            client.log_artifact(run_id, str(tmp_path / "best_params.json"))
            if best_config_yaml:
                (tmp_path / "best_config.yaml").write_text(best_config_yaml)
                client.log_artifact(run_id, str(tmp_path / "best_config.yaml"))
        log_metrics_batch(run_id, metrics, step=step)
        table = study.trials_dataframe(attrs=("number", "state", "value", "params", "duration",
                                              "user_attrs", "system_attrs", "intermediate_values"))
        if len(table):
            table = table[[c for c in table.columns if not c.startswith("intermediate_values")]]
            table.to_csv(tmp_path / "trials.csv", index=False)
            md = table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False)
            (tmp_path / "trials.md").write_text(md)
            client.log_artifact(run_id, str(tmp_path / "trials.csv"))
            client.log_artifact(run_id, str(tmp_path / "trials.md"))
        for name, fig in _optuna_figures(study, len(complete)):
            path = tmp_path / f"{name}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            import matplotlib.pyplot as plt

            plt.close(fig)
            client.log_artifact(run_id, str(path), artifact_path="plots")


def _optuna_figures(study: Any, n_complete: int) -> list[tuple[str, Any]]:
    """Optuna's matplotlib plots; a plot that cannot be drawn yet (too few trials) is skipped."""
    if n_complete == 0:
        return []
    import optuna.visualization.matplotlib as ovm

    figures = []
    makers = [("optimization_history", ovm.plot_optimization_history)]
    if n_complete >= 2:
        makers.append(("param_importances", ovm.plot_param_importances))
    for name, maker in makers:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = maker(study)
        except Exception as exc:  # e.g. every param constant: no importances to show
            log.info("optuna plot %s skipped: %s", name, exc)
            continue
        ax = ax.flat[0] if hasattr(ax, "flat") else ax
        figures.append((name, ax.figure))
    return figures
