"""The README's MLflow server is not open to the network: it runs MLflow's basic-auth app and binds
127.0.0.1. This starts that server (SQLite behind it instead of PostgreSQL) and checks that a request
without credentials is refused and one with them is served."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import _pg

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _scaleout_server_command() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## More than one machine"):]
    block = re.search(r"```bash\n(.*?mlflow server.*?)```", section, re.S).group(1)
    return " ".join(block.replace("\\\n", " ").split())


def test_readme_scaleout_server_uses_basic_auth_on_localhost():
    command = _scaleout_server_command()
    assert "--app-name basic-auth" in command
    assert "0.0.0.0" not in command and "--host 127.0.0.1" in command
    assert "PASSWORD@" not in command.split("mlflow server", 1)[1]  # the database password is not an argument


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=90) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except urllib.error.URLError:  # not listening yet
        return 0


def test_the_basic_auth_server_refuses_requests_without_credentials(tmp_path):
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs Flask-WTF (pip install -e '.[server]')")
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp_path / 'auth.db'}\n"
                   "admin_username = admin\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = _pg.free_port()
    env = os.environ | {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-admin-password-1",
                        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key",
                        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    mlflow_exe = str(Path(sys.executable).with_name("mlflow"))
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([mlflow_exe, "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port",
                             str(port), "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        deadline = time.monotonic() + 120
        while _get(f"{base}/health") != 200:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        assert _get(search) == 401
        assert _get(search, ("admin", "wrong-password")) == 401
        assert _get(search, ("admin", "a-long-admin-password-1")) == 200
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()
