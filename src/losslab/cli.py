"""The ``losslab`` command line: one thin command per entry point.

Each command loads a YAML config, applies dotted overrides (``-o loss.gamma=2.0`` or
``--overrides "loss.gamma=2.0 data.fold=1"``), checks it (:func:`losslab.pipelines.checks.check_config`)
and calls a pipeline. Heavy modules are imported inside the commands so that ``losslab --help`` stays fast.

Errors reach the user as one line (``losslab: <message>``, exit status 1; 2 for a config error);
the traceback only with ``--debug`` anywhere on the command line or ``LOSSLAB_DEBUG=1``. SIGTERM
ends the current MLflow run KILLED with the reason (exit status 143).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

import typer

# no local variables in tracebacks: they hold configs, storage URLs with passwords and salts
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="losslab: loss-function research on imbalanced medical image classification, tracked in MLflow.")

ConfigOpt = typer.Option(None, "--config", "-c", help="Experiment YAML (e.g. configs/experiment/demo.yaml).")
OverrideOpt = typer.Option(None, "--override", "-o", help="Dotted override KEY=VALUE (repeatable), e.g. loss.gamma=2.0 or loss=focal.")
OverridesOpt = typer.Option("", "--overrides", help="Space-separated overrides in one string (used by MLproject).")


def _overrides(override: Optional[list[str]], overrides: str) -> list[str]:
    from losslab.config import split_overrides

    return list(override or []) + split_overrides(overrides)


def _load(config, override, overrides):
    """Load, override and check a config; a problem is one line naming key, value and file (exit 2)."""
    from losslab.config import ConfigError, load_config
    from losslab.pipelines.checks import check_config

    try:
        return check_config(load_config(config, _overrides(override, overrides)))
    except ConfigError as exc:
        _error(exc)
        raise typer.Exit(2) from None


def _error(exc: BaseException) -> None:
    """One red line on stderr, secrets redacted (a URL's password)."""
    from losslab.redaction import redact_text

    typer.secho(redact_text(str(exc)), fg=typer.colors.RED, err=True)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def preprocess(config: Optional[str] = ConfigOpt, override: Optional[list[str]] = OverrideOpt,
               overrides: str = OverridesOpt,
               force: bool = typer.Option(False, help="Rebuild the cache even if the inputs are unchanged.")) -> None:
    """Raw data -> cache (arrays + parquet index + report.json), logged to MLflow."""
    _setup_logging()
    cfg = _load(config, override, overrides)
    from losslab.pipelines.common import entry_point_run
    from losslab.pipelines.preprocess import run_preprocess

    with entry_point_run("preprocess", cfg.tracking):
        info = run_preprocess(cfg, force=force)
    typer.echo(f"{len(info.index)} cases in {info.cache_dir}; skipped {info.report.get('skipped_count', 0)}"
               f" (reused cache: {info.reused})")


@app.command()
def train(config: Optional[str] = ConfigOpt, override: Optional[list[str]] = OverrideOpt,
          overrides: str = OverridesOpt,
          resume: Optional[str] = typer.Option(None, help="MLflow run id to resume from its last checkpoint.")) -> None:
    """Train one fold (data.fold) or k folds (cv.folds) and log everything to MLflow."""
    _setup_logging()
    cfg = _load(config, override, overrides)
    import contextlib

    from losslab.engine.distributed import is_main_process
    from losslab.pipelines.common import entry_point_run
    from losslab.pipelines.train import run_train

    # under torchrun only rank 0 touches MLflow (and prints the result)
    with entry_point_run("train", cfg.tracking) if is_main_process() else contextlib.nullcontext():
        result = run_train(cfg, resume_run_id=resume or None)
    if not is_main_process():
        return
    from losslab.tasks import task_of

    key = task_of(cfg).headline_metric
    for fold in result.folds:
        value = fold.metrics.get(key, float("nan"))
        typer.echo(f"fold {fold.fold}: {fold.status} run {fold.run_id} best {key}={value:.4f}"
                   + (f" model version {fold.model_version}" if fold.model_version else ""))


@app.command()
def main(config: Optional[str] = typer.Option("configs/experiment/demo.yaml", "--config", "-c"),
         override: Optional[list[str]] = OverrideOpt, overrides: str = OverridesOpt,
         losses: str = typer.Option("ce focal", help="Space-separated loss names to compare."),
         folds: int = typer.Option(3, help="Train each loss on folds 0..folds-1 and compare them paired by fold.")) -> None:
    """The demo: embedded data -> preprocess -> each loss on k folds -> comparison with paired statistics."""
    _setup_logging()
    cfg = _load(config, override, overrides)
    for loss in losses.split():  # fail fast on a bad config, for every loss the demo will train
        _load(config, list(override or []) + [f"loss={loss}"], overrides)
    from losslab.config import ConfigError
    from losslab.pipelines.common import entry_point_run
    from losslab.pipelines.demo import run_demo

    try:
        with entry_point_run("main", cfg.tracking):
            run_demo(config, _overrides(override, overrides), losses.split(), folds)
    except ConfigError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


@app.command()
def evaluate(config: Optional[str] = ConfigOpt, override: Optional[list[str]] = OverrideOpt,
             overrides: str = OverridesOpt,
             model: Optional[str] = typer.Option(None, "--model", "-m", help="models:/<name>@<alias>, models:/<name>/<version>, "
                                                 "a run id or a checkpoint file (evaluate.source)."),
             split: Optional[str] = typer.Option(None, help="val | test | cache (evaluate.split; default test)."),
             fold: Optional[int] = typer.Option(None, help="Validation fold (evaluate.fold): the model's own, from its "
                                                "run; any other fold was training data and is refused."),
             cache_dir: Optional[str] = typer.Option(None, help="Another preprocessed cache, with --split cache."),
             allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Also load a pickle-format registered "
                                               "model (evaluate.allow_pickle): unpickling runs its code, so only for "
                                               "a registry you trust.")) -> None:
    """Score a model (calibrated on validation, with TTA and latency) in a new MLflow run."""
    _setup_logging()
    cfg = _load(config, override, overrides)
    from losslab.pipelines.common import entry_point_run
    from losslab.pipelines.evaluate import SourceNotFoundError, run_evaluate
    from losslab.tracking import UnsafeModelError

    try:
        with entry_point_run("evaluate", cfg.tracking):
            result = run_evaluate(cfg, source=model or None, split=split or None, fold=fold, cache_dir=cache_dir or None,
                                  allow_pickle=allow_pickle or None, data_overrides=[
                                      o for o in _overrides(override, overrides) if o.startswith(("data.", "data="))])
    except (SourceNotFoundError, UnsafeModelError) as exc:
        _error(exc)
        raise typer.Exit(2) from None
    m = result.metrics
    typer.echo(f"evaluate run {result.run_id}: " + ", ".join(
        f"{k}={m[k]:.4f}" for k in ("test/auc", "test/balanced_accuracy", "test_calibrated/balanced_accuracy",
                                    "test/dead_class_count", "latency/p50_ms") if k in m)
        + ", ".join(f"{k}={v:.6f}" for k, v in m.items()
                    if k.startswith(("val/dice_", "val/mean_dice", "test/dice_", "test/mean_dice"))))


@app.command()
def compare(config: Optional[str] = ConfigOpt, override: Optional[list[str]] = OverrideOpt,
            overrides: str = OverridesOpt,
            experiment: Optional[str] = typer.Option(None, "--experiment", "-e", help="Experiment name (default tracking.experiment)."),
            filter_string: Optional[str] = typer.Option(None, "--filter", help="MLflow search filter, e.g. \"tags.`losslab.dataset` = 'brats'\"."),
            metric: Optional[list[str]] = typer.Option(None, "--metric", help="Metric to compare (repeatable); a bare name gets --prefix."),
            metrics: str = typer.Option("", "--metrics", help="Space-separated metrics in one string (used by MLproject)."),
            group_by: str = typer.Option("losslab.loss", "--group-by", help="Tag or param to group runs by "
                                         "(losslab.loss, loss.gamma, data.sampler; tags.X / params.X explicitly)."),
            prefix: str = typer.Option("best_val/", help="Prefix of bare metric names (train's summary metrics)."),
            log_run: bool = typer.Option(True, "--log/--no-log", help="Log the table and plots as a compare run.")) -> None:
    """Mean ± std over folds per loss (or any tag or param), like with like, with paired statistics and
    verdicts, read back from MLflow; table + plots in a compare run."""
    _setup_logging()
    cfg = _load(config, override, overrides)
    from losslab.pipelines.common import entry_point_run
    from losslab.pipelines.compare import DEFAULT_METRICS, ExperimentNotFoundError, run_compare

    chosen = list(metric or []) + metrics.split() or list(DEFAULT_METRICS)
    try:
        compared = cfg.tracking.model_copy(update={"experiment": experiment or cfg.tracking.experiment})
        with entry_point_run("compare", compared):
            result = run_compare(experiment or cfg.tracking.experiment, filter_string or None, chosen, group_by,
                                 prefix, cfg.tracking.tracking_uri, log_run=log_run)
    except ExperimentNotFoundError as exc:
        _error(exc)
        raise typer.Exit(2) from None
    typer.echo(result.markdown())
    if result.run_id:
        typer.echo(f"compare run {result.run_id}")


@app.command()
def doctor(target: str = typer.Argument(..., help="A run id (a parent run: its fold runs) or an experiment name."),
           config: Optional[str] = ConfigOpt, override: Optional[list[str]] = OverrideOpt,
           overrides: str = OverridesOpt,
           log_run: bool = typer.Option(True, "--log/--no-log", help="Write doctor.md and the losslab.doctor tag to each run.")) -> None:
    """Each alarm of the runs, with its likely cause and the config changes to try (read back from MLflow)."""
    _setup_logging()
    cfg = _load(config, override, overrides)
    from losslab.pipelines.common import entry_point_run
    from losslab.pipelines.doctor import run_doctor

    try:
        with entry_point_run("doctor"):
            result = run_doctor(target, cfg.tracking.tracking_uri, log=log_run)
    except LookupError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(result.text())


@app.command()
def sweep(config: Optional[str] = ConfigOpt, override: Optional[list[str]] = OverrideOpt,
          overrides: str = OverridesOpt,
          study: Optional[str] = typer.Option(None, help="Study name (sweep.study; default <tracking.experiment>-sweep)."),
          storage: Optional[str] = typer.Option(None, help="Optuna storage URL (sweep.storage; default sqlite:///optuna.db). "
                                                "A URL with a password goes in $LOSSLAB_SWEEP_STORAGE or the file "
                                                "sweep.storage_file, not here: command lines are visible to other users."),
          n_trials: Optional[int] = typer.Option(None, "--n-trials", help="Trials this worker runs (sweep.n_trials)."),
          max_trials: Optional[int] = typer.Option(None, "--max-trials", help="Stop once the study has this many finished trials."),
          timeout: Optional[float] = typer.Option(None, help="Seconds this worker runs trials for (sweep.timeout)."),
          best: bool = typer.Option(False, "--best", help="Print the best config as YAML ready to `train` and exit.")) -> None:
    """Optuna over config overrides (sweep.space), each trial a `train`; re-running continues the study."""
    _setup_logging()
    cfg = _load(config, override, overrides)
    from losslab.config import ConfigError
    from losslab.pipelines.common import entry_point_run
    from losslab.pipelines.sweep import best_config_yaml, run_sweep, sweep_settings

    try:
        settings = sweep_settings(cfg, study=study or None, storage=storage or None, n_trials=n_trials,
                                  max_trials=max_trials, timeout=timeout)
        if best:
            typer.echo(best_config_yaml(cfg, settings), nl=False)
            return
        with entry_point_run("sweep", cfg.tracking):
            result = run_sweep(cfg, settings)
    except ConfigError as exc:
        _error(exc)
        raise typer.Exit(2) from None
    typer.echo(f"study {result.study_name}: {result.trials_run} trial(s) by this worker; parent run {result.parent_run_id}; "
               f"best value {result.best_value} with {result.best_params}")


@app.command()
def distill(config: Optional[str] = typer.Option("configs/experiment/distill_medpix.yaml", "--config", "-c"),
            override: Optional[list[str]] = OverrideOpt, overrides: str = OverridesOpt,
            resume: Optional[str] = typer.Option(None, "--resume", help="A stopped or killed distill run id: keep "
                                                 "its finished runs, continue the unfinished one from its last checkpoint.")) -> None:
    """Image+text teacher (trained or models:/...), cached teacher outputs, one student per loss + student alone."""
    _setup_logging()
    cfg = _load(config, override, overrides)
    from losslab.pipelines.common import entry_point_run
    from losslab.pipelines.distill import distillation_table, run_distill

    with entry_point_run("distill", cfg.tracking):
        result = run_distill(cfg, resume_run_id=resume or None)
    table = distillation_table(cfg.tracking.experiment, parent_run_id=result.parent_run_id)
    typer.echo(table.drop(columns=["run_id"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    typer.echo(f"distill run {result.parent_run_id}; teacher {result.teacher_model_uri or result.teacher_run_id}; "
               f"teacher outputs {result.teacher_cache_key} ({'reused' if result.teacher_cache_reused else 'computed'})")


@app.command()
def study(config: str = typer.Option(..., "--config", "-c", help="Study YAML (configs/study/<name>.yaml)."),
          override: Optional[list[str]] = OverrideOpt, overrides: str = OverridesOpt,
          workers: int = typer.Option(0, "--workers", help="Worker processes on this machine (default: the study "
                                      "file's `workers`, else 1); CPU threads and GPUs are divided among them."),
          storage: Optional[str] = typer.Option(None, help="Optuna storage URL shared by every worker (default: the "
                                                "study file's, else $LOSSLAB_STUDY_STORAGE, else studies.db next to "
                                                "the MLflow store). A URL with a password goes in the variable or "
                                                "the file `storage_file`, not here."),
          threads: Optional[int] = typer.Option(None, help="torch CPU threads per worker (default: the cores / workers)."),
          write_results: str = typer.Option("", "--write-results", help="Write the study's section into this "
                                            "markdown file, from the store."),
          show_progress: bool = typer.Option(True, "--progress/--no-progress", help="Cells done, ETA, each "
                                             "worker's cell and epoch (on stderr).")) -> None:
    """Variants × folds × seeds as cells claimed by workers, sequential until decided; tables in MLflow."""
    _setup_logging()
    from losslab.config import ConfigError
    from losslab.config.study import load_study
    from losslab.pipelines.common import entry_point_run
    from losslab.pipelines.study import run_study

    try:
        loaded = load_study(config, _overrides(override, overrides))
        with entry_point_run("study", loaded.variants[loaded.spec.reference].tracking):
            result = run_study(loaded, workers=workers or None, storage=storage or None, threads=threads,
                               write_results=write_results or None, show_progress=show_progress)
    except ConfigError as exc:
        _error(exc)
        raise typer.Exit(2) from None
    if result.failed:
        from losslab.pipelines.study import failure_line

        _error(failure_line(result))
    if result.failed or not result.complete:
        raise typer.Exit(1)


DEBUG_ENV = "LOSSLAB_DEBUG"


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _one_line(exc: BaseException) -> str:
    from losslab.config import ConfigError

    from losslab.redaction import redact_text

    text = " ".join(redact_text(str(exc)).split())
    return text if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {text}"


def run(argv: Optional[list[str]] = None) -> int:
    """The console script: ``--debug`` (anywhere) or ``LOSSLAB_DEBUG=1`` shows tracebacks; otherwise
    an error is one line on stderr. Returns the exit status."""
    from losslab.termination import Terminated, sigterm_raises

    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        args = [a for a in args if a != "--debug"]
        os.environ[DEBUG_ENV] = "1"
    try:
        with sigterm_raises():
            app(args=args, prog_name="losslab")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Terminated as exc:
        typer.secho(f"losslab: {exc}", fg=typer.colors.RED, err=True)
        return 143
    except Exception as exc:
        if _debug():
            raise
        typer.secho(f"losslab: {_one_line(exc)} (--debug or {DEBUG_ENV}=1 for the traceback)",
                    fg=typer.colors.RED, err=True)
        from losslab.config import ConfigError

        return 2 if isinstance(exc, ConfigError) else 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
