"""A `ray start --head` of its own for `ray job submit` tests: on 127.0.0.1, with its own temp dir
and free ports, stopped by process group and temp dir (never `ray stop`, which stops every Ray on
the machine)."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RayHead:
    def __init__(self, tmp_path):
        self.temp_dir = f"/tmp/rayt-{os.getpid()}-{int(time.time()) % 100000}"  # short: socket paths
        self.gcs_port, self.dash_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"
        self.log = tmp_path / "ray-head.log"
        self.proc = None

    def bin(self, name):
        return os.path.join(os.path.dirname(sys.executable), name)

    def client_env(self):
        path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
        return {**os.environ, "PATH": path, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}

    def start(self):
        cmd = [
            self.bin("ray"),
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(self.gcs_port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(self.dash_port),
            "--temp-dir",
            self.temp_dir,
            "--num-cpus",
            "4",
            "--include-dashboard",
            "true",
            "--disable-usage-stats",
            # the agent's default port (52365) may be held by another Ray on this machine
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--block",
        ]
        with open(self.log, "w") as log:  # the head from the venv: jobs run its python
            self.proc = subprocess.Popen(
                cmd, env=self.client_env(), stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
                return self
            except urllib.error.HTTPError:  # 401 without a token: the dashboard is up
                return self
            except OSError:
                time.sleep(1)
        raise AssertionError(f"ray head did not start: {self.log.read_text()[-2000:]}")

    def submit(self, cmd, tries=10):
        """The dashboard answers before its job agent is up: retry while it says so."""
        for _ in range(tries):
            out = subprocess.run(
                cmd, cwd=REPO, env=self.client_env(), capture_output=True, text=True, timeout=600
            )
            if "No available agent" not in out.stdout + out.stderr:
                return out
            time.sleep(3)
        return out

    def stop(self):
        import psutil

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)  # Ray drains for up to 30 s; the test needs no drain
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        deadline = time.time() + 30
        while self.leftovers() and time.time() < deadline:
            for p in self.leftovers():
                try:
                    psutil.Process(p).kill()
                except psutil.Error:
                    pass
            time.sleep(1)

    def leftovers(self):
        import psutil

        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            if any(self.temp_dir in part for part in p.info["cmdline"] or []):
                found.append(p.info["pid"])
        return found


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
