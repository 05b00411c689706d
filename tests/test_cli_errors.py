"""Errors a user can fix end every job at once with one line and a fixed exit status (pipeline.cli):
config values outside what their field allows, a batch larger than the training split, repeated
list flags, storage failures, a silent S3 endpoint, a model path that does not exist."""

import dataclasses
import errno
import socket
import time

import pytest

from benchmarks import quality
from benchmarks import translate as bench_translate
from jobs import train as train_job
from jobs import translate as translate_job
from jobs import tune as tune_job
from models import MODELS
from pipeline import cli, launch, storage
from pipeline.config import ConfigError, flatten
from pipeline.data import read_manifest
from pipeline.run_config import make_config, override

FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "fake-access-key-0123", "AWS_SECRET_ACCESS_KEY": "fake-secret-key-012345"}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSMUTE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def no_launch(monkeypatch):
    """A job that reaches MLflow or Ray fails the test: config errors must stop it before either."""
    def refuse(*args, **kwargs):
        raise AssertionError("MLflow or Ray was started")

    monkeypatch.setattr(train_job, "start_tracking", refuse)
    monkeypatch.setattr(launch, "init_ray", refuse)


def _numeric_keys(cfg):
    for key, value in flatten(cfg).items():
        items = value if isinstance(value, tuple) else (value,)
        if items and all(isinstance(v, int | float) and not isinstance(v, bool) for v in items):
            yield key, value


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_every_number_of_every_model_rejects_negative_and_nan(model_name):
    cfg = make_config(model_name)
    keys = dict(_numeric_keys(cfg))
    assert "train.log_every" in keys and "optim.lr" in keys and "checkpoint.keep" in keys
    for key, value in keys.items():
        bad = tuple(-1 for _ in value) if isinstance(value, tuple) else -1
        with pytest.raises(ConfigError, match=rf"^{key}=-1\b.*not allowed: a finite number [><]"):
            override(cfg, {key: bad})
        if isinstance(value, float):
            with pytest.raises(ConfigError, match=rf"^{key}=nan is not allowed"):
                override(cfg, [f"{key}=nan"])


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_every_word_with_choices_rejects_others_and_lists_them(model_name):
    cfg = make_config(model_name)
    words = [key for key, _ in _choice_fields(cfg)]
    assert "data.reader" in words and "eval.label_domain" in words
    assert model_name == "cogan" or "model.norm" in words
    for key, choices in _choice_fields(cfg):
        with pytest.raises(ConfigError, match=rf"^{key}=bogus is not allowed: one of {choices[0]!r}"):
            override(cfg, {key: "bogus"})


def _choice_fields(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _choice_fields(value, f"{prefix}{f.name}.")
        elif "choices" in f.metadata and f.name != "model_name":  # the recipe fixes the model
            yield prefix + f.name, f.metadata["choices"]


@pytest.mark.parametrize("setting, allowed", [
    ("model.norm=bogus", "one of 'batch'"), ("train.log_every=0", ">= 1"), ("optim.lr=nan", ">= 0"),
    ("optim.lr=-1", ">= 0"), ("data.crop_size=-3", ">= 0"), ("checkpoint.keep=-1", ">= 1"),
])
def test_train_refuses_a_bad_value_in_one_line_before_mlflow_or_ray(setting, allowed, home, no_launch,
                                                                     capsys):
    assert train_job.main(["--recipe", "dualgan_facades-quick", "--set", setting]) == cli.USAGE
    err = capsys.readouterr().err.strip()
    key, value = setting.split("=")
    assert err.startswith(f"error: {key}={value}") and allowed in err and "\n" not in err


@pytest.mark.parametrize("text, says", [("[1, 2]", "must be a JSON object"), ("{not json", "not valid JSON"),
                                        ('{"model_name": "nope"}', "model_name='nope' is not allowed")])
def test_a_config_file_that_is_no_run_config_is_named(text, says, tmp_path, home, no_launch, capsys):
    path = tmp_path / "best_config.json"
    path.write_text(text)
    assert train_job.main(["--config", str(path)]) == cli.USAGE
    err = capsys.readouterr().err
    assert f"--config {path}" in err and says in err and "Traceback" not in err


def test_a_batch_larger_than_the_split_stops_before_mlflow(facades_small_dst, home, no_launch, capsys):
    base = ["--recipe", "pix2pix_facades-quick", "--no-ray", "--set", f"data.path={facades_small_dst}"]
    assert train_job.main([*base, "train.batch_size=1000"]) == cli.USAGE
    err = capsys.readouterr().err
    assert "train.batch_size=1000 is not allowed: at most" in err and "train split" in err
    manifest = read_manifest(facades_small_dst)
    largest = max(manifest["counts"]["train"].values())
    fits = override(make_config("pix2pix"), {"train.batch_size": largest})
    launch.check_batches_fit(fits, manifest)  # the largest batch that fits passes
    with pytest.raises(ConfigError, match="at most 1"):
        launch.check_batches_fit(override(fits, {"scaling.num_workers": largest}), manifest)


def test_repeated_list_flags_accumulate():
    args = train_job.parse_args(["--recipe", "x", "--set", "a=1", "b=2", "--set", "c=3"])
    assert args.set == ["a=1", "b=2", "c=3"]
    args = tune_job.parse_args(["--recipe", "x", "--set", "a=1", "--set", "b=2",
                                "--space", "k=uniform:0:1", "--space", "j=choice:a,b"])
    assert args.set == ["a=1", "b=2"] and args.space == ["k=uniform:0:1", "j=choice:a,b"]
    assert tune_job.parse_args(["--recipe", "x"], {"space": ["d=1"]}).space == ["d=1"]
    assert quality.parse_args(["--recipe", "x", "--set", "a=1", "--set", "b=2"]).set == ["a=1", "b=2"]
    assert bench_translate.parse_args(["--batch-size", "4", "--batch-size", "8"]).batch_size == [4, 8]
    assert bench_translate.parse_args([]).batch_size == [16]


def test_exit_statuses_are_listed_in_every_jobs_help(capsys):
    for job in (train_job.parse_args, translate_job.parse_args, tune_job.parse_args):
        with pytest.raises(SystemExit):
            job(["--help"])
        out = capsys.readouterr().out
        assert "Exit status" in out and "3  storage" in out


def test_known_errors_map_to_one_line_and_a_status():
    wrapped = RuntimeError("worker died")
    wrapped.__cause__ = storage.StorageError("S3 GET s3://b/k at http://x failed: 403")
    cases = [
        (ConfigError("train.steps=0 is not allowed"), cli.USAGE, "train.steps=0"),
        (wrapped, cli.STORAGE, "S3 GET s3://b/k"),
        (PermissionError(errno.EACCES, "Permission denied", "/out/x.png"), cli.STORAGE, "/out/x.png"),
        (OSError(errno.ENOSPC, "No space left on device", "/out/y.png"), cli.STORAGE, "no space left"),
        (FileNotFoundError(errno.ENOENT, "No such file", "/in/z"), cli.USAGE, "/in/z"),
    ]
    for exc, status, says in cases:
        assert cli.error_status(exc)[0] == status and says in cli.error_status(exc)[1]
    assert cli.error_status(ValueError("a bug")) is None


@pytest.fixture
def silent_endpoint(monkeypatch):
    """An S3 endpoint that accepts connections and never answers, with a 3 s budget per call."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    for name, value in FAKE_KEYS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TRANSMUTE_S3_TIMEOUT_S", "3")
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def test_a_silent_endpoint_fails_boto3_and_pyarrow_calls_within_the_bound(silent_endpoint):
    started = time.monotonic()
    with pytest.raises(storage.StorageError, match="no answer within 1 s, 3 attempts"):
        storage.read_bytes("s3://bucket/key", silent_endpoint)
    assert time.monotonic() - started < 15  # a failure bound (3 s + backoff), not a benchmark
    filesystem, path = storage.arrow_filesystem("s3://bucket/key", silent_endpoint)
    started = time.monotonic()
    with pytest.raises(OSError):
        filesystem.get_file_info(path)
    assert time.monotonic() - started < 15


def test_the_default_time_of_one_s3_call_is_bounded(monkeypatch):
    monkeypatch.delenv("TRANSMUTE_S3_TIMEOUT_S", raising=False)
    connect, read = storage.timeouts()
    assert storage.MAX_ATTEMPTS * max(connect, read) <= 20
    monkeypatch.setenv("TRANSMUTE_S3_TIMEOUT_S", "soon")
    with pytest.raises(storage.StorageError, match="TRANSMUTE_S3_TIMEOUT_S=soon must be a number"):
        storage.timeouts()


def test_train_on_a_silent_s3_endpoint_ends_with_one_line_and_status_3(silent_endpoint, home, no_launch,
                                                                       capsys):
    started = time.monotonic()
    status = train_job.main(["--recipe", "pix2pix_facades-quick", "--set", "data.path=s3://bucket/facades",
                             f"storage.endpoint={silent_endpoint}"])
    err = capsys.readouterr().err
    assert status == cli.STORAGE and time.monotonic() - started < 15
    assert err.startswith("error: S3 HEAD s3://bucket/facades/_manifest.json") and "no answer" in err


def test_translate_names_a_model_path_that_does_not_exist(tmp_path, capsys):
    status = translate_job.main(["--model", "/nonexistent/run", "--input", str(tmp_path), "--output",
                                 str(tmp_path / "out"), "--no-ray"])
    err = capsys.readouterr().err
    assert status == cli.USAGE and "/nonexistent/run does not exist" in err and "'name'" not in err


def test_translate_names_a_checkpoints_garbage_config_json(tmp_path, capsys):
    checkpoint = tmp_path / "run" / "checkpoint_00000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "nets.safetensors").write_bytes(b"")
    (checkpoint / "config.json").write_text("garbage{")
    status = translate_job.main(["--model", str(checkpoint), "--input", str(tmp_path), "--output",
                                 str(tmp_path / "out"), "--no-ray"])
    err = capsys.readouterr().err
    assert status == cli.USAGE and f"{checkpoint}/config.json: not valid JSON" in err
