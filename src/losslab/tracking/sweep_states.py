"""Optuna trials as MLflow runs: a trial's state as its run's status, and the sweep's summary."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.tracking import MlflowClient

from losslab.redaction import redact_text
from losslab.tracking.runs import MAX_PARAM_LENGTH, clear_error_tags, log_metrics_batch, markdown_table

log = logging.getLogger(__name__)

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
            (tmp_path / "trials.md").write_text(markdown_table(table))
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
