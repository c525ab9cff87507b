"""Everything that talks to MLflow, one responsibility per module:

* :mod:`~losslab.tracking.runs` — store set-up, managed runs, what every run logs (config, metric
  batches, figures, tables);
* :mod:`~losslab.tracking.callback` — :class:`MLflowCallback`, the engine callback (per-epoch
  logging, checkpoints, alarms, plots);
* :mod:`~losslab.tracking.model_io` — the safe ``losslab`` flavor, registration with an alias,
  download;
* :mod:`~losslab.tracking.sweep_states` — Optuna trial states as run states, the sweep summary.

The names below are the package's public interface.
"""

from losslab.tracking.callback import STRICT_ENV, MLflowCallback
from losslab.tracking.model_io import UnsafeModelError, download_model, log_and_register_model
from losslab.tracking.runs import (DEFAULT_TRACKING_URI, ERROR_TAGS, MAX_PARAM_LENGTH, clear_error_tags, config_params,
                                   default_artifact_location, local_store_path, log_config, log_figure,
                                   log_metrics_batch, log_table_artifacts, managed_run, markdown_table,
                                   prepare_store, resolve_tracking_uri, setup_tracking)
from losslab.tracking.sweep_states import (STUDY_TAG, SWEEP_ROLE_TAG, TRIAL_NUMBER_TAG, TRIAL_STATE_TAG,
                                           fail_dead_trial_runs, find_trial_runs, log_sweep_summary, mark_trial_run,
                                           trial_run)

__all__ = [
    "DEFAULT_TRACKING_URI", "ERROR_TAGS", "MAX_PARAM_LENGTH", "STRICT_ENV", "STUDY_TAG", "SWEEP_ROLE_TAG",
    "TRIAL_NUMBER_TAG", "TRIAL_STATE_TAG", "MLflowCallback", "UnsafeModelError", "clear_error_tags",
    "config_params", "default_artifact_location", "download_model", "fail_dead_trial_runs", "find_trial_runs",
    "local_store_path", "log_and_register_model", "log_config", "log_figure", "log_metrics_batch",
    "log_sweep_summary", "log_table_artifacts", "managed_run", "mark_trial_run", "markdown_table",
    "prepare_store", "resolve_tracking_uri", "setup_tracking", "trial_run",
]
