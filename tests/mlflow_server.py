"""A real MLflow tracking server for tests: `mlflow server` on 127.0.0.1, SQLite and local artifacts.

Wire it in tests/conftest.py with
    from mlflow_server import *  # noqa: F401,F403

The server is the venv's own mlflow (`python -m mlflow server`), one uvicorn worker, on a free port,
with a SQLite backend and proxied artifacts (`--artifacts-destination`, so clients upload over
HTTP as they would to a remote server) in a session tmp dir. MLflow 3's security middleware
already accepts Host 127.0.0.1:<port> by default, so no --allowed-hosts is needed. Telemetry and the
job runner (huey consumer processes that tests never use) are off. It runs in its own process
group so that stopping it (SIGTERM, then SIGKILL) also ends the uvicorn child it spawns.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

__all__ = ["mlflow_server"]

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`start()` / `stop()`; `uri` ("http://127.0.0.1:PORT") for clients."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.log_path = self.workdir / "server.log"
        self.process = None
        self.uri = None

    def start(self, timeout_s: float = 120) -> "MlflowServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        args = [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--artifacts-destination", str(self.workdir / "mlartifacts"),
        ]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            cwd=self.workdir, start_new_session=True)
        self.uri = f"http://127.0.0.1:{port}"
        self._wait_healthy(timeout_s)
        return self

    def _wait_healthy(self, timeout_s: float) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with opener.open(self.uri + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self, grace_s: float = 15) -> None:
        """SIGTERM the group (mlflow forwards it to uvicorn, which shuts down cleanly), then
        SIGKILL whatever of the group is left."""
        if self.process is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL)
        self.process.wait(5)
        self.process = None

    def _signal_group(self, sig) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:  # the whole group has exited
            pass


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    try:
        yield server
    finally:
        server.stop()
