"""The README's two set-up commands exist, and CI runs the README's test command verbatim."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _commands():
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)


def test_readme_opens_with_demo_and_test_commands():
    demo, test = _commands()[:2]
    assert "mlflow run . -e main --env-manager local" in demo
    assert "torch==2.14.1 torchvision==0.29.1" in demo and "torch==2.14.1 torchvision==0.29.1" in test
    assert "pytest" in test


def test_ci_runs_the_readme_test_command():
    test = _commands()[1]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test in ci


def _readme_line(prefix: str) -> str:
    """The README's command line that starts with ``prefix`` (inside a bash block)."""
    lines = [line.strip() for block in _commands() for line in block.splitlines() if line.strip().startswith(prefix)]
    assert lines, f"no README command starts with {prefix!r}"
    return lines[0]


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the real main job (90 cases) plus evaluate with TTA and latency, on 2 cores
def test_readme_flow_main_job_then_evaluate_on_the_alias_then_compare(tmp_path):
    """The README's commands in the order given, from a clean copy of the project: the main job under
    ``mlflow run`` (only the epochs shortened, through the MLproject's ``overrides`` parameter), then
    ``evaluate`` on the registered alias with ``--split test``, then ``compare``; each must succeed."""
    project = tmp_path / "project"
    generated = {".git", ".venv", ".pytest_cache", "data", "cache", "outputs", "mlruns", "mlartifacts"}

    def leave_out(folder: str, names: list[str]) -> set[str]:  # what a working copy made by running things holds
        top = Path(folder) == REPO
        return {n for n in names if (top and (n in generated or n.startswith(("mlflow.db", "optuna.db"))))
                or n == "__pycache__" or n.endswith(".egg-info")}

    shutil.copytree(REPO, project, ignore=leave_out)
    bin_dir = str(Path(sys.executable).parent)  # python, mlflow (the README activates the venv)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LOSSLAB_CONFIG_ROOT"))}
    env |= {"PATH": bin_dir + os.pathsep + env.get("PATH", ""), "PYTHONPATH": str(project / "src")}

    def run(command: str, timeout: int) -> str:
        proc = subprocess.run(["bash", "-c", command], cwd=project, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        return proc.stdout

    main_job = _commands()[0].split("&& ")[-1]  # after the install steps
    assert main_job.startswith("MLFLOW_TRACKING_URI=sqlite:///mlflow.db mlflow run . -e main")
    run(main_job + ' -P overrides="train.epochs=1 train.max_train_batches=4"', timeout=2400)
    cli = f"{shlex.quote(sys.executable)} -m losslab.cli "
    evaluate = _readme_line("losslab evaluate -c configs/experiment/demo.yaml --model models:/losslab-brats-mil@candidate")
    assert "--split test" in evaluate
    evaluated = run(evaluate.replace("losslab ", cli, 1), timeout=600)
    assert "evaluate run " in evaluated and "test/balanced_accuracy=" in evaluated
    compared = run(_readme_line("losslab compare --experiment losslab-demo").replace("losslab ", cli, 1), timeout=600)
    table = [line for line in compared.splitlines() if line.startswith("|")]
    assert any(" ce " in line for line in table) and any(" focal " in line for line in table), compared

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    version = client.get_model_version_by_alias("losslab-brats-mil", "candidate")
    exp = client.get_experiment_by_name("losslab-demo")
    trains = client.search_runs([exp.experiment_id], "tags.`losslab.entry_point` = 'train'")
    assert version.run_id in {r.info.run_id for r in trains}  # the alias is on one of the main job's fold runs
    assert {r.data.tags["losslab.loss"] for r in trains} == {"ce", "focal"}
