"""No secret leaves its place: S3 keys never enter a Ray runtime env or a pickled filesystem, and
credentials in a URI never reach an MLflow param, a checkpoint's config.json or a printed line."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from fixtures_data import FACADES_SMALL, REPO
from mlflow import MlflowClient

from jobs import train as train_job
from pipeline import data, launch, storage
from pipeline.config import ConfigError

SMALL = ["train.log_every=1", "eval.max_images=8", "scaling.cpus_per_worker=0.5"]

# Train 4 steps on S3 data with S3 checkpoints, then a one-trial search with its storage on S3: one
# process, one local Ray started by the driver (as jobs/train.py does), in its own temp dir.
DRIVER = """
import sys
from jobs import train, tune
data, runs, search, small = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
rc = train.main(["--recipe", "cyclegan_facades-quick", "--set", f"data.path={data}",
                 f"storage.path={runs}", "train.steps=4", "checkpoint.every=2", "eval.every=2",
                 "tracking.run_name=secret-run", *small])
assert rc == 0, rc
rc = tune.main(["--recipe", "dualgan_facades-quick", "--name", "secret-search", "--max-steps", "2",
                "--eval-every", "2", "--cpus-per-trial", "0.5", "--num-samples", "1", "--scheduler", "fifo",
                "--space", "optim.lr=grid:1e-4", "--storage", search, "--set", f"data.path={data}", *small])
assert rc == 0, rc
"""


def files_under(root: Path):
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            yield path


@pytest.mark.integration
def test_s3_keys_appear_nowhere_after_training_and_a_search_on_ray(s3_env, tmp_path):
    bucket = s3_env.make_bucket("secrets")
    data.ingest(str(FACADES_SMALL), f"{bucket}/facades", data.IngestOptions(shard_rows=8), progress=False)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))  # short: Ray's socket paths
    home = tmp_path / "home"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(ray_tmp), "TRANSMUTE_HOME": str(home),
           "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db"}
    args = [f"{bucket}/facades", f"{bucket}/runs", f"{bucket}/tune", *SMALL]
    try:
        out = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        keys = storage.list_files(bucket)
        assert "runs/secret-run/checkpoint_00000004/config.json" in keys  # it did train on S3
        assert any(k.startswith("tune/secret-search/") for k in keys)  # and searched on S3
        assert list(ray_tmp.rglob("runtime_env_agent.log")), "no Ray session folder to search"
        secret = s3_env.secret_key.encode()
        leaks = [str(p) for root in (ray_tmp, home) for p in files_under(root) if secret in p.read_bytes()]
        leaks += [k for k in keys if secret in storage.read_bytes(f"{bucket}/{k}")]
        leaks += [name for name, text in (("stdout", out.stdout), ("stderr", out.stderr))
                  if s3_env.secret_key in text]
        assert leaks == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_s3_filesystem_pickles_without_keys_and_workers_get_no_keys(s3_env):
    """What Ray pickles (the S3 filesystem) and sends as a runtime env (forwarded_env) holds no key;
    the unpickled filesystem still reads, with the credentials of the process that unpickles it."""
    from pipeline.loop import forwarded_env
    from pipeline.run_config import make_config, override

    uri = s3_env.make_bucket("pickled") + "/x.bin"
    storage.write_bytes(uri, b"payload")
    filesystem, path = storage.arrow_filesystem(uri)
    blob = pickle.dumps(filesystem)
    assert s3_env.secret_key.encode() not in blob and s3_env.access_key.encode() not in blob
    with pickle.loads(blob).open_input_stream(path) as f:
        assert f.read() == b"payload"
    cfg = override(make_config("cyclegan"), {"data.path": "s3://pickled/d"})
    sent = forwarded_env(cfg)
    assert sent["AWS_ENDPOINT_URL"] == s3_env.endpoint  # settings travel, credentials do not
    assert not {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"} & set(sent)
    assert s3_env.secret_key not in json.dumps(sent)


def test_open_credentials_file_is_warned_about(s3_env, tmp_path, monkeypatch, caplog):
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = a\naws_secret_access_key = b\n")
    creds.chmod(0o644)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    storage.arrow_filesystem("s3://any/x")
    assert f"{creds} has mode 644" in caplog.text and "chmod 600" in caplog.text


@pytest.mark.parametrize("uri, public", [
    ("http://alice:pw-S3CRET@host:5000/x", "http://host:5000/x"),
    ("https://alice@host", "https://host"),
    ("s3://b/k?X-Amz-Credential=AK%2F1&X-Amz-Signature=S3CRET&versionId=3", "s3://b/k?versionId=3"),
    ("postgresql://u:S3CRET@db/mlflow?sslmode=require&password=S3CRET", "postgresql://db/mlflow?sslmode=require"),
    ("http://h/api?token=S3CRET&api_key=S3CRET&Secret=S3CRET#frag", "http://h/api#frag"),
    ("sqlite:////home/me/mlflow.db", "sqlite:////home/me/mlflow.db"),
    ("/local/path", "/local/path"),
])
def test_public_uri_drops_userinfo_and_secret_query_parameters(uri, public):
    assert storage.public_uri(uri) == public


def test_tracking_credentials_move_to_the_environment(monkeypatch):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")  # recorded, so the test leaves the environment as it found it
        monkeypatch.delenv(name)
    assert launch.keep_credentials_out("http://alice:p%40ss@h:1/") == "http://h:1/"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss"
    assert launch.keep_credentials_out("postgresql://u@db/m") == "postgresql://u@db/m"  # no secret
    with pytest.raises(ConfigError, match="postgresql://db/m carries credentials"):
        launch.keep_credentials_out("postgresql://u:S3CRET@db/m")


@pytest.mark.integration
def test_tracking_uri_password_is_not_logged_stored_or_printed(mlflow_server, facades_small_dst, tmp_path,
                                                              monkeypatch, capfd):
    """MLFLOW_TRACKING_URI with user:password@: the run still logs (MLflow takes the credentials
    from the environment), and the password is in no param, tag, config.json or printed line."""
    password = "pw-Tr4ck1ng-7c41"
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("TRANSMUTE_HOME", str(tmp_path / "home"))
    host = mlflow_server.uri.removeprefix("http://")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{password}@{host}")
    sets = [f"data.path={facades_small_dst}", f"storage.path={tmp_path}/runs", "train.steps=2",
            "checkpoint.every=2", "eval.every=0", "tracking.run_name=userinfo", "tracking.register=false",
            *SMALL]  # not registered: the shared server's cyclegan_facades-quick-ab/1 is test_train_job's
    assert train_job.main(["--recipe", "cyclegan_facades-quick", "--no-ray", "--set", *sets]) == 0
    assert train_job.main(["--recipe", "cyclegan_facades-quick", "--print-config", "--set", *sets]) == 0
    out, err = capfd.readouterr()
    assert password not in out + err and f"at {mlflow_server.uri}" in out
    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("transmute").experiment_id],
                                "attributes.run_name = 'userinfo'")
    assert run.data.params["tracking.uri"] == mlflow_server.uri
    assert password not in json.dumps([run.data.params, run.data.tags])
    config = tmp_path / "runs" / "userinfo" / "checkpoint_00000002" / "config.json"
    assert json.loads(config.read_text())["tracking"]["uri"] == mlflow_server.uri
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == password  # where MLflow (and local workers) read it
