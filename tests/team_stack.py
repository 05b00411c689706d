"""The services of infra/compose.yaml, run for real on this machine: the test runs the compose
services' own commands with only host, ports, CPU counts and node resources substituted.

- `Netns`: a network namespace joined to the host by a veth pair (a /30 of 10.213.x.x), so that the
  second Ray node has its own network stack and reaches the head, MLflow and S3 only over the
  veth, as a second machine would. Needs root (`ip netns`); deleted with the namespace.
- `MlflowAuthServer`: `mlflow server --app-name basic-auth` on PostgreSQL, artifacts on S3.
- `RayNode`: `ray start [--head]`, own temp dir, stopped by process group and temp dir (never
  `ray stop`, which stops every Ray on the machine).
"""

import configparser
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "infra" / "compose.yaml"
BIN = Path(sys.executable).parent
# options a compose service leaves at their defaults, which several Rays on one machine must not share
MACHINE_LOCAL = ("node_ip_address", "temp_dir", "dashboard_agent_listen_port", "ray_client_server_port")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def service_argv(service: str, **values: str) -> list[str]:
    """The compose service's command with the given options' values replaced (`host="..."` replaces
    `--host`'s value; `node_ip_address` adds `--node-ip-address`), the executable taken from this venv.
    Every option replaced must already be in the command, so a flag dropped from compose fails here."""
    argv = list(compose()["services"][service]["command"])
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        elif name in MACHINE_LOCAL:
            argv[-1:-1] = [flag, value]
        else:
            raise AssertionError(f"{flag} is not in the command of compose service {service}: {argv}")
    program = {"mlflow": [sys.executable, "-m", "mlflow"], "ray": [str(BIN / "ray")]}[argv[0]]
    return program + argv[1:]


def service_env(service: str, secrets: dict[str, str], replace: dict[str, str]) -> dict[str, str]:
    """The compose service's environment: each `${NAME...}` from `secrets` (what infra/.env holds),
    and values naming compose hosts or paths replaced whole (`replace`)."""
    env = {}
    for key, value in compose()["services"][service]["environment"].items():
        value = re.sub(r"\$\{(\w+)[^}]*\}", lambda m: secrets[m.group(1)], str(value))
        env[key] = replace.get(value, value)
    return env


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Netns:
    def __init__(self):
        used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        third = next(n for n in range(os.getpid() % 200, 256) if f"10.213.{n}." not in used)
        self.name = f"tm{os.getpid()}"
        self.host_if, self.node_if = f"{self.name}h"[:15], f"{self.name}n"[:15]
        self.host_ip, self.node_ip = f"10.213.{third}.1", f"10.213.{third}.2"

    def start(self) -> "Netns":
        ip("netns", "add", self.name)
        ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.node_if, "netns", self.name)
        ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        ip("link", "set", self.host_if, "up")
        ip("-n", self.name, "addr", "add", f"{self.node_ip}/30", "dev", self.node_if)
        ip("-n", self.name, "link", "set", self.node_if, "up")
        ip("-n", self.name, "link", "set", "lo", "up")
        return self

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def stop(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)  # takes the veth pair along
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    """Until `url` answers at all (an HTTP error such as 401 counts: the server is up)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            opener.open(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def stop_group(proc: subprocess.Popen | None, grace_s: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(grace_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


class MlflowAuthServer:
    """The compose `mlflow` service: basic auth on, runs and users in PostgreSQL, artifacts on S3."""

    def __init__(self, workdir: Path, host: str, port: int, tracking_db: str, auth_db: str,
                 secrets: dict[str, str], s3_endpoint: str):
        self.workdir, self.host, self.port = Path(workdir), host, port
        self.tracking_db, self.auth_db = tracking_db, auth_db
        self.secrets, self.s3_endpoint = secrets, s3_endpoint
        self.uri = f"http://{host}:{port}"
        self.log = self.workdir / "mlflow.log"
        self.proc = None

    def auth_config(self) -> Path:
        """infra/mlflow-auth.ini with this machine's user store."""
        config = configparser.ConfigParser()
        config.read(REPO / "infra" / "mlflow-auth.ini")
        config["mlflow"]["database_uri"] = self.auth_db
        path = self.workdir / "auth.ini"
        with open(path, "w") as f:
            config.write(f)
        return path

    def start(self) -> "MlflowAuthServer":
        """Launch without waiting (its database migrations take a while): `wait()` before use."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = service_argv("mlflow", host=self.host, port=str(self.port), workers="1",
                            backend_store_uri=self.tracking_db, allowed_hosts=f"{self.host}:{self.port}")
        replace = {"http://s3:8333": self.s3_endpoint, "/app/infra/mlflow-auth.ini": str(self.auth_config())}
        env = {**os.environ, **service_env("mlflow", self.secrets, replace),
               "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.workdir, start_new_session=True)
        return self

    def wait(self) -> None:
        wait_http(self.uri + "/health", self.proc, self.log)

    def stop(self) -> None:
        stop_group(self.proc)


class RayNode:
    def __init__(self, workdir: Path, name: str, argv: list[str], env: dict, prefix: list[str] = ()):
        self.temp_dir = argv[argv.index("--temp-dir") + 1]
        self.argv, self.env, self.prefix = argv, env, list(prefix)
        self.log = Path(workdir) / f"ray-{name}.log"
        self.proc = None

    def start(self) -> "RayNode":
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([*self.prefix, *self.argv], stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)
        return self

    def stop(self) -> None:
        import psutil

        stop_group(self.proc, grace_s=3)  # Ray drains for up to 30 s; nothing here needs the drain
        deadline = time.time() + 30
        while self.leftovers() and time.time() < deadline:
            for pid in self.leftovers():
                try:
                    psutil.Process(pid).kill()
                except psutil.Error:
                    pass
            time.sleep(1)
        if not self.leftovers():
            shutil.rmtree(self.temp_dir, ignore_errors=True)  # sessions, logs, sockets: ours alone

    def leftovers(self) -> list[int]:
        import psutil

        return [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
                if any(self.temp_dir in part for part in p.info["cmdline"] or [])]
