"""`jobs/tune.py --resume` never unpickles search state that this search did not sign
(pipeline.tune_state): a crafted tuner.pkl or experiment_state-*.json in the search's storage is
refused before Ray reads it, and a search killed hard (SIGKILL) still resumes. The Ctrl-C resume
is tests/test_tune.py::test_interrupted_search_resumes_without_repeating_finished_trials."""

import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys

import pytest
from mlflow import MlflowClient
from pyarrow import fs as pafs
from test_tune import REPO, common, parent_and_children, wait_for_finished_trials

from jobs import tune as tune_job
from pipeline import storage, tune_state


class Payload:
    """Unpickling it creates `marker`: a stand-in for any code a pickle can run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_state(marker) -> bytes:
    """An experiment state whose runner data is a cloudpickle blob, the way Ray embeds objects."""
    blob = {"_type": "CLOUDPICKLE_FALLBACK", "value": pickle.dumps(Payload(marker)).hex()}
    return json.dumps({"trial_data": [], "runner_data": blob, "stats": {"start_time": 0}}).encode()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSMUTE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(tune_state.KEY_ENV, raising=False)
    return tmp_path / "home"


@pytest.mark.parametrize("crafted", ["tuner.pkl", "experiment_state-2099-01-01_00-00-00.json"])
def test_a_crafted_state_file_is_refused_before_it_is_unpickled(
    crafted, facades_small_dst, ray_cluster, home, tmp_path, capsys
):
    """A legitimate search folder (its Tuner made, tuner.pkl signed), then a writer of the shared
    storage replaces tuner.pkl or adds a newer experiment state: the resume refuses, naming it."""
    args = common(facades_small_dst, f"sqlite:///{tmp_path}/mlflow.db", "shared", steps=2, every=1)
    args += ["--num-samples", "1", "--scheduler", "fifo"]
    parsed = tune_job.parse_args(args)
    cfg = tune_job.base_config(parsed)
    storage_path = os.path.join(cfg.home, "tune")
    tune_job.make_tuner(parsed, cfg, [], "max", "shared", storage_path)
    folder = os.path.join(storage_path, "shared")
    assert os.path.exists(os.path.join(folder, "tuner.pkl"))
    marker = tmp_path / "code-ran"
    payload = pickle.dumps(Payload(marker)) if crafted.endswith(".pkl") else crafted_state(marker)
    with open(os.path.join(folder, crafted), "wb") as f:
        f.write(payload)
    try:
        rc = tune_job.main([*args, "--resume"])
    finally:
        assert not marker.exists(), "the crafted pickle ran"
    err = capsys.readouterr().err
    assert rc == 4 and f"{folder}/{crafted} is not signed" in err, err


def test_signatures_bind_key_search_and_file_and_keep_recent_versions(tmp_path):
    fs, folder = pafs.LocalFileSystem(), str(tmp_path / "search")
    key = tune_state.load_key(str(tmp_path / "keys" / "k"), create=True)
    assert os.stat(tmp_path / "keys" / "k").st_mode & 0o777 == 0o600
    os.makedirs(folder)

    def write(name, data):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)

    write("tuner.pkl", b"tuner")
    write("experiment_state-1.json", b"old")
    write("best_config.json", b"{}")  # the project's own data, never unpickled: not checked
    tune_state.sign(key, "s", fs, folder, {"tuner.pkl": b"tuner", "experiment_state-1.json": b"old"})
    # a save signs the new version before it is uploaded; a kill before the upload leaves the old one
    tune_state.sign(key, "s", fs, folder, {"experiment_state-1.json": b"new"})
    assert tune_state.verify(key, "s", fs, folder) == ["experiment_state-1.json", "tuner.pkl"]
    write("experiment_state-1.json", b"new")
    tune_state.verify(key, "s", fs, folder)
    with pytest.raises(tune_state.StateRefused, match="experiment_state-1.json is not signed"):
        tune_state.verify(key, "other-search", fs, folder)  # copied under another name
    with pytest.raises(tune_state.StateRefused, match="is not signed"):
        tune_state.verify(b"another key of 32 bytes.........", "s", fs, folder)
    write("searcher-state-x.pkl", b"added")
    with pytest.raises(tune_state.StateRefused, match="searcher-state-x.pkl is not signed"):
        tune_state.verify(key, "s", fs, folder)
    os.chmod(tmp_path / "keys" / "k", 0o644)
    with pytest.raises(tune_state.StateRefused, match="chmod 600"):
        tune_state.load_key(str(tmp_path / "keys" / "k"), create=False)


@pytest.mark.integration
def test_signatures_on_s3(s3_env, tmp_path):
    """The list is written and read through the S3 filesystem Ray is given for an s3:// --storage."""
    base = f"{s3_env.make_bucket('t-tune-state')}/tune/s"
    fs, folder = storage.arrow_filesystem(base)
    storage.write_bytes(f"{base}/tuner.pkl", b"tuner")
    key = tune_state.load_key(str(tmp_path / "k"), create=True)
    tune_state.sign_stored(key, "s", fs, folder, ["tuner.pkl"])
    assert tune_state.verify(key, "s", fs, folder) == ["tuner.pkl"]
    storage.write_bytes(f"{base}/trial_1/error.pkl", b"crafted")  # a failed trial's pickled error
    storage.write_bytes(f"{base}/trial_2/result.json", b"{}")  # data, never unpickled: not checked
    with pytest.raises(tune_state.StateRefused, match="trial_1/error.pkl is not signed"):
        tune_state.verify(key, "s", fs, folder)
    tune_state.sign(key, "s", fs, folder, {"trial_1/error.pkl": b"crafted"})
    assert tune_state.verify(key, "s", fs, folder) == ["trial_1/error.pkl", "tuner.pkl"]
    storage.write_bytes(f"{base}/experiment_state-x.json", b"{}")
    with pytest.raises(tune_state.StateRefused, match="experiment_state-x.json is not signed"):
        tune_state.verify(key, "s", fs, folder)


@pytest.mark.integration
def test_a_search_killed_hard_resumes_from_its_signed_state(facades_small_dst, tmp_path):
    """SIGKILL once a trial has finished (Ray had no chance to save or sign anything more), then
    --resume: the state on storage passes the check and every trial completes. Fails when Ray's
    saves are not signed as they happen (signing only tuner.pkl refuses this resume)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "TRANSMUTE_HOME": str(tmp_path / "home"), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop(tune_state.KEY_ENV, None)
    # three trials, one at a time: the kill lands while the second one trains
    args = common(facades_small_dst, uri, "killed", steps=6, every=2) + [
        "--space", "optim.lr=grid:1e-4,2e-4,3e-4", "--num-samples", "1", "--max-concurrent", "1",
        "--scheduler", "fifo",
    ]
    MlflowClient(uri).search_experiments()  # the store exists before the search and this test both open it
    with open(tmp_path / "search.log", "w") as log:  # kept in tmp_path for a failure's post-mortem
        proc = subprocess.Popen(
            [sys.executable, "jobs/tune.py", *args], cwd=REPO, env=env,
            stdout=log, stderr=log, start_new_session=True,
        )
    try:
        wait_for_finished_trials(uri, "killed", 1, proc)
        assert proc.poll() is None, "the search ended before it could be killed"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(timeout=60)
    done = subprocess.run(
        [sys.executable, "jobs/tune.py", *args, "--resume"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Ray saves its state every ~10 s, so a trial that finished just before the kill may redo its
    # last steps from its last recorded checkpoint (no step check here, unlike the Ctrl-C test)
    _, _, children = parent_and_children(uri, "killed")
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)


def _failing_trial(config):
    raise ValueError("this trial fails on purpose")


@pytest.mark.integration
def test_a_failed_trials_error_pickle_is_signed_and_a_crafted_one_refused(ray_cluster, tmp_path):
    """Ray writes a failed trial's exception to `<trial>/error.pkl`, and a resumed search's results
    unpickle it: the signer signs Ray's own on the state save that uploads it, and one replaced by a
    writer of the storage is refused before anything reads it."""
    from ray import tune

    key_file = str(tmp_path / "keys" / "k")
    key = tune_state.load_key(key_file, create=True)
    run_config = tune.RunConfig(name="s", storage_path=str(tmp_path / "tune"), verbose=0,
                                callbacks=[tune_state.StateSigner("s", key_file)])  # fmt: skip
    tuner = tune.Tuner(_failing_trial, run_config=run_config)
    fs, folder = pafs.LocalFileSystem(), str(tmp_path / "tune" / "s")
    tune_state.sign_stored(key, "s", fs, folder, ["tuner.pkl"])  # as jobs/tune.py does
    results = tuner.fit()
    assert results.errors, "the trial was meant to fail"
    names = tune_state.verify(key, "s", fs, folder)
    errors = [n for n in names if n.endswith("/error.pkl")]
    assert len(errors) == 1, names
    marker = tmp_path / "code-ran"
    with open(os.path.join(folder, errors[0]), "wb") as f:
        f.write(pickle.dumps(Payload(marker)))
    with pytest.raises(tune_state.StateRefused, match=f"{errors[0]} is not signed"):
        tune_state.verify(key, "s", fs, folder)
    assert not marker.exists()
