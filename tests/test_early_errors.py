"""Errors come early and short, and nothing is substituted silently:

* a missing ``data.root`` is generated only at an embedded generator's default location or when
  ``data.generate`` asks for it; a mistyped root fails naming the path;
* an empty config file is refused;
* unknown loss names, loss parameter typos and bad values, a fold index out of range and
  ``data.source_kwargs`` typos or bad values are found when the config is loaded, as one line naming
  key, value and file, before any MLflow run opens or any cache is built; the traceback only with
  ``--debug`` or ``LOSSLAB_DEBUG=1``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from losslab.config import ConfigError, DataConfig, load_config
from losslab.data.cache import ensure_raw_data
from losslab.pipelines.checks import check_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "experiment" / "demo.yaml"


def _cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "LOSSLAB_DEBUG"} | {"PYTHONPATH": str(REPO / "src")} | env
    full_env["MLFLOW_TRACKING_URI"] = f"sqlite:///{cwd / 'mlflow.db'}"
    return subprocess.run([sys.executable, "-m", "losslab.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=600)


# ------------------------------------------------------------------------------ data.root
def test_a_mistyped_data_root_fails_naming_the_path_with_the_shipped_config(tmp_path):
    typo = tmp_path / "BraTS2018_Trainign"
    out = _cli("preprocess", "-c", str(DEMO), "-o", f"data.root={typo}", "-o", f"data.cache_dir={tmp_path / 'c'}",
               cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert f"data.root {typo} does not exist" in lines[-1] and "Traceback" not in out.stderr
    assert lines[-1].startswith("losslab: FileNotFoundError: ") and "--debug" in lines[-1]
    assert not typo.exists() and not (tmp_path / "c" / "index.parquet").exists()  # nothing generated, no cache
    # the traceback only with --debug (anywhere on the line) or LOSSLAB_DEBUG=1
    args = ("preprocess", "-c", str(DEMO), "-o", f"data.root={typo}")
    for debug in (_cli(*args, "--debug", cwd=tmp_path), _cli(*args, cwd=tmp_path, LOSSLAB_DEBUG="1")):
        assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


def test_generation_only_at_the_default_location_or_when_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = {"num_cases": 6, "shape": [24, 24, 8]}
    # the default embedded location (relative to the working directory) is generated ...
    assert ensure_raw_data(DataConfig(root="data/embedded_brats", generator_kwargs=small)) is True
    assert len(list((tmp_path / "data" / "embedded_brats").glob("*/*/*_t1.nii.gz"))) == 6
    # ... another missing or empty root is not, unless data.generate names a generator
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "elsewhere", tmp_path / "empty"):
        with pytest.raises(FileNotFoundError, match=f"data.root {root} (does not exist|is empty)"):
            ensure_raw_data(DataConfig(root=str(root), generator_kwargs=small))
    assert not (tmp_path / "elsewhere").exists() and not any((tmp_path / "empty").iterdir())
    assert ensure_raw_data(DataConfig(root=str(tmp_path / "elsewhere"), generate="embedded_brats",
                                      generator_kwargs=small)) is True
    # a non-embedded generator has no default location: data/msd may be meant for the real data
    with pytest.raises(FileNotFoundError, match="data.root data/msd does not exist"):
        ensure_raw_data(DataConfig(source="msd", root="data/msd"))


# ------------------------------------------------------------------------------ empty config
def test_an_empty_config_file_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here yet\n")
    with pytest.raises(ConfigError, match=f"{empty}: the config file is empty"):
        load_config(empty)
    out = _cli("train", "-c", str(empty), cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip() == f"{empty}: the config file is empty (no keys); " \
                                                          "refusing to run the built-in defaults"
    assert not (tmp_path / "mlflow.db").exists()


# ------------------------------------------------------------------------------ load-time checks
@pytest.mark.parametrize("override,expected", [
    ("loss=focall", "loss.name = 'focall' in command-line override 'loss=focall': unknown loss 'focall'; known losses: "),
    ("loss.gama=2", "loss.gama = 2 in command-line override 'loss.gama=2': loss 'ce': unknown parameter(s) 'gama'"),
    ("loss.label_smoothing=1.5", "loss.label_smoothing = 1.5 in command-line override 'loss.label_smoothing=1.5': "
                                 "ValueError"),
    ("loss.class_weights=[1, 2, 3]", "loss.class_weights = [1, 2, 3] in command-line override "
                                     "'loss.class_weights=[1, 2, 3]': ValueError: loss 'ce': class_weights has 3"),
    ("data.fold=5", "data.fold = 5 in command-line override 'data.fold=5': out of range: folds are 0..2 "
                    "(data.num_folds=3)"),
    ("cv.folds=[0, 5]", "cv.folds = [0, 5] in command-line override 'cv.folds=[0, 5]': fold indices must be in 0..2"),
    ("data.source_kwargs.min_brain_fractoin=0.1", "data.source_kwargs.min_brain_fractoin = 0.1 in command-line "
                                                  "override 'data.source_kwargs.min_brain_fractoin=0.1': source 'brats' "
                                                  "has no parameter 'min_brain_fractoin'; its parameters: labels_csv, "
                                                  "min_brain_fraction, image_size"),
    ("data.source_kwargs.image_size=0", "data.source_kwargs.image_size = 0 in command-line override "
                                        "'data.source_kwargs.image_size=0': Input should be greater than or equal to 1"),
])
def test_load_time_checks_name_key_value_and_file(override, expected):
    with pytest.raises(ConfigError) as err:
        check_config(load_config(DEMO, [override]))
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_a_key_set_in_a_file_is_blamed_on_that_file(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("defaults:\n  - experiment/demo\nloss:\n  gamma: 2.0\n")
    with pytest.raises(ConfigError, match=rf"^loss.gamma = 2.0 in {exp}: loss 'ce': unknown parameter"):
        check_config(load_config(exp))
    lumbar = load_config("experiment/rsna_lumbar_v8", ["data.source_kwargs.image_size=0"])
    with pytest.raises(ConfigError, match="data.source_kwargs.image_size = 0 in command-line override"):
        check_config(lumbar)
    for path in sorted((REPO / "configs" / "experiment").glob("*.yaml")):  # every shipped experiment passes
        check_config(load_config(path))


def test_cli_error_is_one_line_before_any_run_or_cache_and_traceback_only_with_debug(tmp_path):
    args = ("train", "-c", str(DEMO), "-o", "loss.gama=2", "-o", f"data.cache_dir={tmp_path / 'cache'}")
    out = _cli(*args, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "loss.gama = 2 in command-line override 'loss.gama=2': loss 'ce': unknown parameter(s) 'gama'; accepted "
        "parameters: class_weights, class_counts, num_classes, beta, label_smoothing, ignore_index, reduction"]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "cache").exists()
    assert not (tmp_path / "data").exists()  # the embedded data was not generated either

