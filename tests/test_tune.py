"""Searches with Ray Tune: ASHA stops a bad trial, PBT continues from its donor's step, an
interrupted search resumes without repeating finished trials, and `ray job submit` of
jobs/tune_dualgan.py works against a `ray start --head` cluster that the test starts and stops."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient
from ray_head import RayHead
from search_fixture import METRIC

from jobs import train as train_job
from jobs import tune as tune_job
from jobs.recipes import recipe
from pipeline import search
from pipeline.config import ConfigError
from pipeline.data import read_manifest
from pipeline.tracking import runs_under

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def common(data, uri, name, steps=6, every=2):
    return [
        "--recipe",
        "dualgan_facades-quick",
        "--name",
        name,
        "--max-steps",
        str(steps),
        "--eval-every",
        str(every),
        "--cpus-per-trial",
        "0.5",
        "--set",
        f"data.path={data}",
        "eval.max_images=8",
        f"tracking.uri={uri}",
        "train.log_every=1",
    ]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSMUTE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def parent_and_children(uri, name, experiment="transmute"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    (parent,) = client.search_runs(
        [exp.experiment_id], f"tags.`tune.search` = '{name}' and tags.`tune.role` = 'parent'"
    )
    return client, parent, runs_under(uri, parent.info.run_id)


# ----------------------------------------------------------------------------- spaces (no Ray)


def test_space_specs_are_typed_and_checked():
    cfg = recipe("dualgan_facades-quick")
    dims = {
        d.key: d
        for d in search.parse_space(
            [
                "renorm.rmax=uniform:1.5:5",
                "optim.lr=loguniform:1e-5:1e-3",
                "renorm.warmup_steps=int:0:100",
                "model.norm=choice:batch,instance",
                "model.lambda_a=grid:100,500",
                "train.seed=3",
            ],
            cfg,
        )
    }
    assert dims["renorm.rmax"].values == (1.5, 5.0) and dims["model.norm"].values == ("batch", "instance")
    assert dims["model.lambda_a"].values == (100.0, 500.0) and dims["train.seed"].values == (3,)
    assert set(search.pbt_mutations(list(dims.values()))) == {"renorm.rmax", "optim.lr"}
    with pytest.raises(ConfigError, match="valid keys"):
        search.parse_space(["model.rmax=uniform:1:2"], cfg)
    with pytest.raises(ConfigError, match="LOW < HIGH"):
        search.parse_space(["renorm.rmax=uniform:5:1"], cfg)
    with pytest.raises(ConfigError, match="expected int"):
        search.parse_space(["model.ngf=choice:8,wide"], cfg)
    with pytest.raises(ConfigError, match="validation metric"):
        search.check_metric("test/pixel_acc_ab")
    assert search.metric_mode("eval/cycle_l1_a") == "min" and search.metric_mode("eval/pixel_acc_ab") == "max"


def test_space_from_a_json_file(tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"optim.lr": "loguniform:1e-5:1e-3", "model.norm": "choice:batch,instance"}))
    dims = search.parse_space(["model.norm=choice:instance"], recipe("dualgan_facades-quick"), str(path))
    assert {d.key: d.values for d in dims} == {"optim.lr": (1e-5, 1e-3), "model.norm": ("instance",)}


def test_trial_names_show_the_searched_values():
    params = {"optim.lr": 1.6e-4, "model.lambda_cycle": 586.3, "model.norm": "batch", "train.seed": 3}
    name = search.trial_display_name(params, ["optim.lr", "model.lambda_cycle", "model.norm"])
    assert name == "lr=1.6e-4 lambda_cycle=586 norm=batch"
    assert search.trial_display_name({"model.lambda_a": 0.5, "renorm.lambda_a": 2e5}) == (
        "model.lambda_a=0.5 renorm.lambda_a=2e5")  # a shared last part keeps the whole key


def test_objective_first_tracker_logs_the_objective_before_anything_else():
    class Recorder:
        run_id, calls = "r", []

        def log_metrics(self, metrics, step):
            self.calls.append((list(metrics), step))

        def end(self, status="FINISHED"):
            self.calls.append(("end", status))

    inner = Recorder()
    tracker = search.ObjectiveFirst(inner, "eval/x")
    tracker.log_metrics({"baseline/x": 0.1}, 0)
    tracker.log_metrics({"loss/G": 1.0}, 1)
    tracker.log_metrics({"eval/x": 0.5, "step": 2}, 2)
    tracker.log_metrics({"loss/G": 0.9}, 3)
    tracker.end()
    assert inner.calls == [(["objective"], 2), (["baseline/x"], 0), (["loss/G"], 1),
                           (["eval/x", "step", "objective"], 2), (["loss/G"], 3), ("end", "FINISHED")]


# ----------------------------------------------------------------------------- what a search logs to MLflow


@pytest.mark.integration
def test_trial_runs_are_named_by_their_searched_values(tiny_search):
    _, _, children = parent_and_children(tiny_search.uri, tiny_search.name)
    assert sorted(c.info.run_name for c in children) == ["lr=0.001 norm=batch", "lr=2e-4 norm=batch"]


@pytest.mark.integration
def test_trial_checkpoint_tag_points_at_its_checkpoint_on_storage(tiny_search):
    _, _, children = parent_and_children(tiny_search.uri, tiny_search.name)
    for child in children:
        latest = child.data.tags["checkpoint.latest"]
        assert latest.startswith(os.path.join(tiny_search.storage, tiny_search.name) + "/"), latest
        assert os.path.basename(latest) == "checkpoint_000001"  # the second report of 4 steps, every 2
        assert {"meta.json", "nets.safetensors"} <= set(os.listdir(latest)), latest  # a real checkpoint
        with open(os.path.join(latest, "meta.json")) as f:
            assert json.load(f)["step"] == 4


@pytest.mark.integration
def test_trial_runs_carry_the_dataset(tiny_search, facades_small_dst):
    manifest = read_manifest(facades_small_dst)
    client, _, children = parent_and_children(tiny_search.uri, tiny_search.name)
    for child in children:
        (given,) = client.get_run(child.info.run_id).inputs.dataset_inputs
        assert given.dataset.digest == manifest["content_hash"][:36]
        assert json.loads(given.dataset.profile) == manifest["counts"]
        assert json.loads(given.dataset.source) == {"uri": manifest["source"]}  # where it was ingested from
        assert [(t.key, t.value) for t in given.tags] == [("mlflow.data.context", "training")]


@pytest.mark.integration
def test_objective_is_each_trials_first_metric(tiny_search):
    """MLflow's compare view plots the first metric the runs share; a trial's baselines come first
    in time, so without care that is a constant."""
    client, _, children = parent_and_children(tiny_search.uri, tiny_search.name)
    for child in children:
        run = client.get_run(child.info.run_id)
        assert list(run.data.metrics)[0] == "objective"
        assert run.data.metrics["objective"] == run.data.metrics[METRIC]


@pytest.mark.integration
def test_search_parent_logs_a_plot_the_table_and_a_description(tiny_search, tmp_path):
    client, parent, _ = parent_and_children(tiny_search.uri, tiny_search.name)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"objective_vs_keys.png", "results.csv", "best_config.json"} <= artifacts
    from PIL import Image

    plot = Image.open(client.download_artifacts(parent.info.run_id, "objective_vs_keys.png", str(tmp_path)))
    assert plot.width >= 2 * plot.height  # two searched keys side by side (λ_A is constant)
    note = parent.data.tags["mlflow.note.content"]
    assert "dualgan_facades-quick" in note and f"best {METRIC} = " in note and "lr=" in note
    assert parent.data.metrics["objective"] == pytest.approx(tiny_search.summary["best_value"])


# ----------------------------------------------------------------------------- searches on the session's Ray


@pytest.mark.integration
def test_trials_under_a_time_budget_keep_the_recipes_report_interval(home):
    """A -15min base has no step count until each trial times itself: a sixth of the placeholder
    would leave ASHA one report a trial."""
    budget = tune_job.base_config(tune_job.parse_args(["--recipe", "dualgan_facades-15min"]))
    assert budget.train.max_minutes == 15.0
    assert budget.eval.every == budget.checkpoint.every == recipe("dualgan_facades-15min").eval.every
    short = tune_job.base_config(tune_job.parse_args(
        ["--recipe", "dualgan_facades-15min", "--minutes", "3", "--eval-every", "200"]))
    assert (short.train.max_minutes, short.eval.every) == (3.0, 200)
    steps = tune_job.base_config(
        tune_job.parse_args(["--recipe", "dualgan_facades-15min", "--max-steps", "600"]))
    assert (steps.train.max_minutes, steps.train.steps, steps.eval.every) == (0.0, 600, 100)


def test_asha_stops_the_clearly_worse_trial_and_releases_its_cpus(
    facades_small_dst, ray_cluster, home, tmp_path
):
    """Trial 1 learns (lr 1e-3); trial 2 cannot (lr 0), so its cycle error stays at the start value
    and ASHA stops it at the first rung. One trial at a time, in grid order."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = common(facades_small_dst, uri, "asha", steps=8, every=2) + [
        "--space",
        "optim.lr=grid:1e-3,0.0",
        "--metric",
        "eval/cycle_l1_a",
        "--num-samples",
        "1",
        "--max-concurrent",
        "1",
        "--scheduler",
        "asha",
    ]
    total = ray_cluster.cluster_resources()["CPU"]
    assert tune_job.main(args) == 0
    client, parent, children = parent_and_children(uri, "asha")
    steps = {
        float(c.data.params["optim.lr"]): max(
            m.step for m in client.get_metric_history(c.info.run_id, "eval/cycle_l1_a")
        )
        for c in children
    }
    assert steps[0.001] == 8 and steps[0.0] < 8, steps  # the lr-0 trial was stopped early
    assert float(parent.data.tags["best.optim.lr"]) == 0.001
    deadline = time.time() + 30
    while ray_cluster.available_resources().get("CPU", 0) < total and time.time() < deadline:
        time.sleep(0.5)
    assert ray_cluster.available_resources().get("CPU", 0) == total  # stopped trials gave their CPUs back
    best = os.path.join(home, "tune", "asha", "best_config.json")
    with open(best) as f:
        assert json.load(f)["optim"]["lr"] == 0.001
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_config.json", "results.csv"} <= artifacts
    assert (
        train_job.main(
            [
                "--config",
                best,
                "--no-ray",
                "--set",
                "train.steps=2",
                "eval.every=0",
                "checkpoint.every=2",
                f"tracking.uri={uri}",
                "tracking.run_name=from-best",
            ]
        )
        == 0
    )


@pytest.mark.integration
def test_pbt_exploit_continues_from_the_donors_step(facades_small_dst, ray_cluster, home, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # 20 steps, a report every 2: ten chances for the worse trial to be exploited, since asynchronous
    # PBT decides on the reports as they interleave (8 steps once gave none on a loaded machine)
    args = common(facades_small_dst, uri, "pbt", steps=20, every=2) + [
        "--space",
        "optim.lr=loguniform:1e-5:1e-3",
        "model.lambda_a=uniform:100:1000",
        "--metric",
        "eval/cycle_l1_a",
        "--num-samples",
        "2",
        "--scheduler",
        "pbt",
        "--seed",
        "1",
    ]
    assert tune_job.main(args) == 0
    client, _, children = parent_and_children(uri, "pbt")
    assert len(children) == 2  # an exploit copies the donor's state, never its MLflow run
    restarts = []
    for child in children:
        resumed = client.get_metric_history(child.info.run_id, "progress/resumed_from_step")
        losses = client.get_metric_history(child.info.run_id, "loss/G/total")
        for r in resumed:  # what this trial logged after taking the donor's state
            after = sorted(m.step for m in losses if m.timestamp >= r.timestamp)
            restarts.append((r.value, after))
    assert restarts, "no trial was exploited"
    for donor_step, after in restarts:
        # it went on from the donor's step (a step-0 restart would log 1, 2, ... again)
        assert donor_step >= 2 and (not after or min(after) == donor_step + 1), restarts


@pytest.mark.integration
def test_interrupted_search_resumes_without_repeating_finished_trials(facades_small_dst, tmp_path):
    """The search runs in its own process; Ctrl-C (SIGINT) once the first trial has finished, then
    --resume: the finished trial is not run again, the others complete."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "TRANSMUTE_HOME": str(tmp_path / "home"), "RAY_USAGE_STATS_ENABLED": "0"}
    args = common(facades_small_dst, uri, "resumable", steps=6, every=3) + [
        "--space",
        "optim.lr=grid:1e-4,2e-4,3e-4",
        "--num-samples",
        "1",
        "--max-concurrent",
        "1",
        "--scheduler",
        "fifo",
    ]
    MlflowClient(uri).search_experiments()  # made here first: polling it while the search creates it
    # raced the two schema migrations (the search died with AttributeError: dimension_attributes)
    proc = subprocess.Popen(
        [sys.executable, "jobs/tune.py", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        finished = wait_for_finished_trials(uri, "resumable", 1, proc)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = subprocess.run(
        [sys.executable, "jobs/tune.py", *args, "--resume"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client, parent, children = parent_and_children(uri, "resumable")
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    for run_id in finished:  # a finished trial was not trained again
        steps = [m.step for m in client.get_metric_history(run_id, "loss/G/total")]
        assert len(steps) == len(set(steps)), steps


def wait_for_finished_trials(uri, name, count, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            _, _, children = parent_and_children(uri, name)
            done = [c.info.run_id for c in children if c.info.status == "FINISHED"]
            if len(done) >= count:
                return done
        except Exception:  # the store or the parent run may not exist yet
            pass
        time.sleep(1)
    raise AssertionError(f"no {count} finished trial(s) of {name} in {timeout}s")


# ----------------------------------------------------------------------------- ray job submit


@pytest.mark.integration
def test_ray_job_submit_of_tune_dualgan(facades_small_dst, tmp_path):
    """`ray start --head` on 127.0.0.1 with its own temp dir, `ray job submit --working-dir .`,
    then only that head is stopped (never `ray stop`, which stops every Ray on the machine)."""
    head = RayHead(tmp_path).start()
    try:
        # the driver imports the uploaded copy (Ray puts it first on PYTHONPATH), not an install of
        # the project: a cluster needs none, and runs the code that was submitted
        where = "import jobs, pipeline; print('imported', jobs.__file__, pipeline.__file__)"
        submit = [head.bin("ray"), "job", "submit", "--address", head.dashboard, "--working-dir", "."]
        out = head.submit([*submit, "--", "python", "-c", where])
        line = next(x for x in out.stdout.splitlines() if x.startswith("imported "))
        assert all(not p.startswith(REPO) and "working_dir_files" in p for p in line.split()[1:]), line
        home = tmp_path / "home"
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        runtime_env = {"env_vars": {"TRANSMUTE_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true"}}
        cmd = [
            head.bin("ray"),
            "job",
            "submit",
            "--address",
            head.dashboard,
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            "python",
            "jobs/tune_dualgan.py",
            *common(facades_small_dst, uri, "submitted", steps=4, every=2)[2:],
            "--num-samples",
            "2",
        ]
        out = head.submit(cmd)
        assert out.returncode == 0 and "succeeded" in out.stdout + out.stderr, (out.stdout + out.stderr)[
            -3000:
        ]
        _, parent, children = parent_and_children(uri, "submitted")
        assert len(children) == 2 and parent.info.status == "FINISHED"
        assert (home / "tune" / "submitted" / "best_config.json").exists()
    finally:
        head.stop()
    assert head.leftovers() == []
