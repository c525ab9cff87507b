"""The README's two set-up commands exist, and CI runs the README's test command verbatim."""

import re
from pathlib import Path

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
