"""Real services for the scale-out tests: a throw-away PostgreSQL cluster and an MLflow server.

The cluster lives in a temp directory, listens on 127.0.0.1 on a free port and is stopped by the
PID of its postmaster. ``initdb`` refuses to run as root, so as root the cluster is created and run
as the ``postgres`` user (``runuser -u postgres --``) in a directory handed to that user.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin_dir() -> Path | None:
    """Debian's ``/usr/lib/postgresql/<version>/bin`` (newest), else ``initdb`` on the PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def unavailable_reason() -> str | None:
    """Why a real cluster cannot be started here, or None when it can."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None or not (bin_dir / "pg_ctl").is_file():
        return "PostgreSQL server binaries (initdb, pg_ctl) are not installed (.ci/run installs Debian's postgresql)"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing: initdb refuses root"
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run initdb as"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install -e '.[test]')"
    return None


class PostgresCluster:
    """``start()`` -> the cluster is up; ``url(db)``; ``create_database(db)``; ``stop()``."""

    def __init__(self) -> None:
        self.bin_dir = postgres_bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="losslab-pg-"))  # directly in /tmp: reachable by postgres
        self.data_dir = self.root / "data"
        self.port = free_port()
        self.pid: int | None = None
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str, timeout: float = 120) -> None:
        proc = subprocess.run(self.as_user + [str(self.bin_dir / args[0]), *args[1:]], capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0:
            log = (self.root / "server.log").read_text() if (self.root / "server.log").is_file() else ""
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr}\n{proc.stdout}\n{log[-3000:]}")

    def start(self) -> "PostgresCluster":
        if self.as_user:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data_dir), "-o", options, "-l", str(self.root / "server.log"), "-w", "-t", "60", "start")
        self.pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        return self

    def url(self, database: str, driver: str = "") -> str:
        """``postgresql://...``; ``driver="psycopg2"`` -> ``postgresql+psycopg2://...`` (SQLAlchemy 2.1's
        plain ``postgresql://`` means psycopg 3, which the MLflow server then needs)."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str, driver: str = "") -> str:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return self.url(name, driver)

    def stop(self) -> None:
        """Fast shutdown by PID (SIGINT to the postmaster), then remove the directory."""
        if self.pid is not None:
            _signal_and_wait(self.pid, signal.SIGINT, 30)
            self.pid = None
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0); reap it if it is ours
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return Path(f"/proc/{pid}").exists() and "zombie" not in _proc_state(pid)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0].lower()
    except (OSError, IndexError):
        return "zombie"


def _signal_and_wait(pid: int, sig: int, timeout: float) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


class MLflowServer:
    """``mlflow server`` on a database URL, with proxied artifacts stored under ``artifacts_dir``."""

    def __init__(self, backend_uri: str, artifacts_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        mlflow_exe = str(Path(sys.executable).with_name("mlflow"))
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen(
            [mlflow_exe, "server", "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts_dir),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "2"],
            stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True)
        self.log_path = log_path

    def wait_healthy(self, timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"mlflow server not healthy after {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM to the server's process group (it forks workers), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        self.log_file.close()


def running_cluster():
    """A throw-away cluster for a module fixture: ``yield from running_cluster()``."""
    cluster = PostgresCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


def running_mlflow_server(postgres: "PostgresCluster", root: Path):
    """An MLflow server on a new database of ``postgres``, its artifacts under ``root`` (``artifacts_dir``),
    for a module fixture: ``yield from running_mlflow_server(postgres, root)``."""
    server = MLflowServer(postgres.create_database("mlflow", driver="psycopg2"), root / "artifacts", root / "server.log")
    server.artifacts_dir = root / "artifacts"
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()
