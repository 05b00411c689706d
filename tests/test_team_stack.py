"""The team stack of infra/: checked statically (Dockerfile, compose file, KubeRay manifests: this
machine has a Docker client but no engine and pulls no images), then run for real on this machine:
PostgreSQL, SeaweedFS S3, `mlflow server --app-name basic-auth` and a two-node Ray cluster (the
second node in its own network namespace), started from the compose services' own commands; a
`ray job submit` of jobs/tune_dualgan.py with one trial on each node, logged with basic auth;
then a registered model from that server translates a dataset on S3."""

import base64
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from postgres import Postgres, free_port
from s3server import S3Server
from team_stack import (
    BIN,
    REPO,
    MlflowAuthServer,
    Netns,
    RayNode,
    compose,
    service_argv,
    service_env,
    wait_http,
)

from jobs import train as train_job
from jobs import tune as tune_job
from jobs.recipes import recipe
from pipeline import data
from pipeline.run_config import override

INFRA = REPO / "infra"
ADMIN_PASSWORD = "mlflow-Adm1n-test-" + secrets.token_hex(4)

# ============================================================================= static checks


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (INFRA / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_dockerfile_builds_on_ray_with_the_project_and_its_pins():
    steps = dockerfile_instructions()
    assert steps[0] == ("FROM", "rayproject/ray:2.60.0-py311")
    import ray

    assert steps[0][1].split(":")[1].startswith(ray.__version__)
    for kind, rest in steps:
        if kind == "COPY":  # every source exists (relative to the build context, the repo root)
            sources = [w for w in shlex.split(rest) if not w.startswith("--")][:-1]
            assert sources and all((REPO / s).exists() for s in sources), rest
    run = " ".join(rest for kind, rest in steps if kind == "RUN")
    project = (REPO / "pyproject.toml").read_text()
    torch_pin = re.search(r'"(torch==[^"]+)"', project).group(1)
    assert torch_pin in run and "download.pytorch.org/whl/cpu" in run
    assert "pip install --no-cache-dir -e '.[server]'" in run
    for pin in ('"mlflow==3.17.2"', '"pyarrow==25', '"boto3', '"psycopg2-binary'):
        assert pin in project, pin  # the image takes these from pyproject.toml
    copied = " ".join(rest for kind, rest in steps if kind == "COPY")
    assert all(f" {package}" in copied for package in ("models", "pipeline", "jobs", "pyproject.toml"))


def env_names(value) -> set[str]:
    return set(re.findall(r"\$\{(\w+)", json.dumps(value)))


def test_compose_services_reference_what_exists():
    spec = compose()
    services = spec["services"]
    assert set(services) == {"postgres", "s3", "mlflow", "ray-head", "ray-worker"}
    documented = {ln.split("=")[0] for ln in (INFRA / "env.example").read_text().splitlines()
                  if ln and not ln.startswith("#")}
    assert env_names(spec) <= documented, env_names(spec) - documented
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in spec["volumes"] or (INFRA / source).exists(), (name, volume)
        if "build" in service:
            context = (INFRA / service["build"]["context"]).resolve()
            assert context == REPO and (context / service["build"]["dockerfile"]).is_file()
        for dep in service.get("depends_on", []):
            assert dep in services
    # the commands run programs that the image has, with arguments their parsers accept
    mlflow = services["mlflow"]
    assert mlflow["command"][:4] == ["mlflow", "server", "--app-name", "basic-auth"]
    assert mlflow["command"][mlflow["command"].index("--backend-store-uri") + 1].startswith("postgresql+psycopg2://")
    assert mlflow["command"][mlflow["command"].index("--artifacts-destination") + 1].startswith("s3://")
    assert Path(mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"].replace("/app/", str(REPO) + "/")).is_file()
    from mlflow.cli import server

    server.make_context("mlflow server", mlflow["command"][2:])  # raises on an unknown option
    for node in ("ray-head", "ray-worker"):
        argv = services[node]["command"]
        assert argv[:2] == ["ray", "start"] and "--block" in argv
        json.loads(argv[argv.index("--resources") + 1])
        from ray.scripts.scripts import start

        start.make_context("ray start", argv[2:])
        env = services[node]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        # credentials sit in the nodes' environment, never in a URI
        assert "@" not in env["MLFLOW_TRACKING_URI"] and "@" not in env["AWS_ENDPOINT_URL"]
    entrypoint = services["s3"]["entrypoint"]
    assert entrypoint[0] == "/bin/sh" and (INFRA / Path(entrypoint[1]).name).is_file()


KUBERAY = {
    "train-rayjob.yaml": ("RayJob", train_job),
    "tune-dualgan-rayjob.yaml": ("RayJob", tune_job),
}


def manifest(name: str) -> dict:
    (doc,) = yaml.safe_load_all((INFRA / name).read_text())
    return doc


def check_cluster(cluster: dict) -> None:
    import ray

    assert cluster["rayVersion"] == ray.__version__
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        container = pod["spec"]["containers"][0]
        assert container["image"] and container["name"]
        env = {e["name"]: e.get("value", "") for e in container["env"]}
        assert env["MLFLOW_TRACKING_URI"].startswith("http") and "@" not in env["MLFLOW_TRACKING_URI"]
        secrets_ = {s["secretRef"]["name"] for s in container["envFrom"]}
        assert secrets_ == {"transmute-s3", "transmute-mlflow"}  # AWS_* and MLFLOW_TRACKING_USERNAME/PASSWORD
    assert all(g["groupName"] and g["replicas"] >= 1 for g in cluster["workerGroupSpecs"])


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_rayjobs_run_commands_the_jobs_accept(name):
    kind, job = KUBERAY[name]
    doc = manifest(name)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", kind)
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    check_cluster(spec["rayClusterSpec"])
    words = shlex.split(spec["entrypoint"])
    script = next(w for w in words if w.endswith(".py"))
    assert (REPO / script.removeprefix("/app/")).is_file(), script
    argv = words[words.index(script) + 1:]
    args = job.parse_args(argv)
    override(recipe(args.recipe), args.set)  # every key exists and every value parses
    sets = dict(s.split("=", 1) for s in args.set)
    assert sets["data.path"].startswith("s3://") and "tracking.uri" not in sets  # the URI: from the env
    assert "runtimeEnvYAML" not in spec  # secrets come from the pods' env, not a runtime env


def test_kuberay_raycluster_for_submitted_jobs():
    doc = manifest("raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    check_cluster(doc["spec"])


# ============================================================================= real servers


def request(url: str, auth: tuple[str, str] | None = None, body: dict | None = None):
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {}


def run(argv: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (argv[:3], (out.stdout + out.stderr)[-4000:])
    return out


class Stack:
    """Everything the test starts, stopped in reverse order whatever happens."""

    def __init__(self):
        self.started = []

    def add(self, thing):
        self.started.append(thing)
        return thing

    def stop(self):
        for thing in reversed(self.started):
            try:
                thing.stop()
            except Exception as e:  # noqa: BLE001 - stop the rest, then report
                print(f"stopping {type(thing).__name__}: {e}", file=sys.stderr)


def submit(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    """The dashboard answers before its job agent is up: retry while it says so."""
    for _ in range(20):
        out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in out.stdout + out.stderr:
            return out
        time.sleep(3)
    return out


def result_node_ips(s3, bucket: str, prefix: str) -> set[str]:
    """The node IP of every trial, from the result.json that each trial wrote to the Tune storage."""
    ips = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            if item["Key"].endswith("/result.json"):
                body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read().decode()
                ips |= {json.loads(line)["node_ip"] for line in body.splitlines() if line.strip()}
    return ips


class Team:
    """The servers of the test, started from infra/compose.yaml's services, and what they hold."""

    def __init__(self, tmp_path: Path, stack: Stack):
        self.tmp, self.stack, self.timings, self.t0 = tmp_path, stack, {}, time.monotonic()
        self.home = tmp_path / "home"
        self.dataset = "s3://transmute/data/facades"

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.timings[phase] = round(now - self.t0, 1)
        self.t0 = now

    def start_servers(self) -> None:
        self.netns = self.stack.add(Netns().start())
        self.host = self.netns.host_ip
        self.pg = self.stack.add(Postgres().start())
        self.s3 = self.stack.add(S3Server(self.tmp / "s3", host=self.host).start())
        for bucket in ("mlflow", "transmute"):
            self.s3.make_bucket(bucket)
        self.env_file = {  # what infra/.env holds for compose
            "POSTGRES_PASSWORD": self.pg.env()["PGPASSWORD"], "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16), "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD, "AWS_ACCESS_KEY_ID": self.s3.access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3.secret_key, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        databases = self.pg.create_database("mlflow"), self.pg.create_database("mlflow_auth")
        self.mlflow = MlflowAuthServer(self.tmp / "mlflow", self.host, free_port(), *databases, self.env_file,
                                       self.s3.endpoint)
        self.stack.add(self.mlflow.start())

    def start_ray(self) -> None:
        """Compose's ray-head and ray-worker services, commands and environments; the worker in the
        network namespace, reaching the head, MLflow and S3 over the veth pair."""
        replace = {"http://mlflow:5000": self.mlflow.uri, "http://s3:8333": self.s3.endpoint,
                   "/home/ray/transmute": str(self.home)}
        self.path = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        node = service_env("ray-head", self.env_file, replace)
        assert node == service_env("ray-worker", self.env_file, replace)
        self.node_env = {**os.environ, **self.path, "RAY_USAGE_STATS_ENABLED": "0", **node}
        gcs, dash, host = free_port(), free_port(), self.host
        tag = f"{os.getpid()}-{int(time.time()) % 100000}"
        head_argv = service_argv(
            "ray-head", port=str(gcs), dashboard_host=host, dashboard_port=str(dash), num_cpus="1",
            node_ip_address=host, temp_dir=f"/tmp/rayh-{tag}", dashboard_agent_listen_port=str(free_port()),
            ray_client_server_port=str(free_port()))
        self.head = self.stack.add(RayNode(self.tmp, "head", head_argv, self.node_env).start())
        self.dashboard = f"http://{host}:{dash}"
        worker_argv = service_argv("ray-worker", address=f"{host}:{gcs}", num_cpus="1",
                                   node_ip_address=self.netns.node_ip, temp_dir=f"/tmp/rayw-{tag}")
        wait_http(self.dashboard + "/api/version", self.head.proc, self.head.log)
        worker = RayNode(self.tmp, "worker", worker_argv, self.node_env, prefix=self.netns.prefix())
        self.stack.add(worker.start())

    def ingest(self, monkeypatch) -> None:
        """The dataset on S3, as a team keeps it."""
        for key, value in self.s3.env().items():
            monkeypatch.setenv(key, value)
        data.ingest(str(REPO / "tests" / "assets" / "facades_small"), self.dataset,
                    data.IngestOptions(shard_rows=8), progress=False)

    def submit_search(self) -> None:
        """The client holds the dashboard address and the Ray token only: no MLflow or S3 secret."""
        client_env = {key: value for key, value in os.environ.items()
                      if not key.startswith(("AWS_", "MLFLOW_TRACKING"))}
        client_env.update(self.path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.env_file["RAY_AUTH_TOKEN"])
        runtime_env = {"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true"}}
        out = submit([str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--working-dir", ".",
                      "--runtime-env-json", json.dumps(runtime_env), "--",
                      "python", "jobs/tune_dualgan.py", "--recipe", "dualgan_facades-quick", "--name", "team",
                      "--num-samples", "2", "--max-steps", "4", "--eval-every", "2", "--cpus-per-trial", "1",
                      "--storage", "s3://transmute/tune",
                      "--set", f"data.path={self.dataset}", "eval.max_images=8", "train.log_every=1"],
                     client_env)
        log = out.stdout + out.stderr
        assert out.returncode == 0 and "succeeded" in log, log[-4000:]

    def check_tracking(self) -> None:
        """The search's parent and trial runs on the shared server, readable with a login only."""
        auth, api = ("admin", ADMIN_PASSWORD), f"{self.mlflow.uri}/api/2.0/mlflow"
        status, found = request(f"{api}/experiments/get-by-name?experiment_name=transmute", auth)
        assert status == 200, status
        query = {"experiment_ids": [found["experiment"]["experiment_id"]]}
        status, found = request(f"{api}/runs/search", auth, query)
        assert status == 200, status
        tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])}
                for r in found["runs"]}
        (parent,) = [run_id for run_id, t in tags.items()
                     if t.get("tune.search") == "team" and t.get("tune.role") == "parent"]
        trials = [run_id for run_id, t in tags.items() if t.get("mlflow.parentRunId") == parent]
        assert len(trials) == 2, tags
        search = f"{api}/runs/search"
        assert request(search, None, query)[0] == 401 and request(search, ("admin", "wrong"), query)[0] == 401
        artifacts = self.s3.client().list_objects_v2(Bucket="mlflow", Prefix="artifacts/")
        assert any(o["Key"].endswith("best_config.json") for o in artifacts.get("Contents", []))

    def train_register_translate(self) -> None:
        """The best trial's config trained and registered, then translated from the registry, as a
        user of the team's server would: credentials in the environment."""
        keys = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
        user_env = {**os.environ, **self.s3.env(), **{k: self.node_env[k] for k in keys},
                    "TRANSMUTE_HOME": str(self.home)}
        best = self.home / "tune" / "team" / "best_config.json"
        run([sys.executable, "jobs/train.py", "--config", str(best), "--no-ray", "--set", "train.steps=2",
             "eval.every=2", "checkpoint.every=2", "tracking.registered_name=team"], user_env)
        self.mark("train and register")
        run([sys.executable, "jobs/translate.py", "--model", "models:/team-ab/1", "--input", self.dataset,
             "--split", "test", "--output", "s3://transmute/translated", "--no-ray", "--no-progress"],
            user_env)
        listed = self.s3.client().list_objects_v2(Bucket="transmute", Prefix="translated/")
        keys = [o["Key"] for o in listed["Contents"]]
        assert any(k.endswith(".png") for k in keys) and "translated/_manifest.json" in keys, keys
        self.mark("translate")


@pytest.mark.integration
def test_tune_on_two_ray_nodes_logs_to_the_shared_mlflow_then_translates(tmp_path, monkeypatch):
    stack = Stack()
    team = Team(tmp_path, stack)
    try:
        team.start_servers()
        team.start_ray()  # while MLflow migrates its databases
        team.ingest(monkeypatch)
        team.mlflow.wait()
        team.mark("servers, Ray nodes, dataset")
        team.submit_search()
        team.mark("search")
        # one CPU per node and one per trial: the two trials ran one on each node
        ran_on = result_node_ips(team.s3.client(), "transmute", "tune/team/")
        assert ran_on == {team.host, team.netns.node_ip}, ran_on
        team.check_tracking()
        team.train_register_translate()
    finally:
        stack.stop()
        team.mark("stop")
        print("team stack timings (s):", team.timings)
    assert team.head.leftovers() == [] and not Path(f"/var/run/netns/{team.netns.name}").exists()
