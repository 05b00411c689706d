"""`jobs/train.py` end to end: real data, Ray Train, a real MLflow server, the model registry."""

import os

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from jobs import train as train_job
from jobs.recipes import RECIPES
from pipeline.registry import load_generator
from pipeline.served_generator import generate

pytestmark = pytest.mark.integration


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSMUTE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _runs(client, experiment="transmute", name=None):
    """The experiment's runs, or those named `name` (the MLflow server is shared with other modules'
    tests, which may log to the same experiment)."""
    exp = client.get_experiment_by_name(experiment)
    where = f"attributes.run_name = '{name}'" if name else ""
    return client.search_runs([exp.experiment_id], filter_string=where) if exp else []


def test_quick_recipe_on_ray_is_tracked_registered_and_resumes_in_the_same_run(
        real_ingests, mlflow_server, ray_cluster, home, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    facades = real_ingests["facades"][0]
    sets = [f"data.path={facades}", "train.steps=20", "eval.every=10", "checkpoint.every=10",
            "scaling.cpus_per_worker=0.5", "tracking.run_name=facades-e2e", "eval.max_images=16",
            "train.log_every=2"]
    assert train_job.main(["--recipe", "cyclegan_facades-quick", "--set", *sets]) == 0
    client = MlflowClient(mlflow_server.uri)
    (run,) = _runs(client, name="facades-e2e")
    assert run.info.status == "FINISHED" and run.info.run_name == "facades-e2e"
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["model.ngf"] == "8" and params["train.batch_size"] == "2" and params["data.path"] == facades
    assert tags["dataset.content_hash"] == real_ingests["facades"][1]["content_hash"]
    assert tags["git.commit"] and tags["checkpoint.latest"].endswith("checkpoint_00000020")
    for key in ("loss/G/total", "perf/images_per_s", "perf/data_wait_fraction", "lr/G",
                "eval/pixel_acc_ab", "eval/psnr_ba", "test/pixel_acc_ab", "test/class_iou_ab",
                "test/ssim_ba", "baseline/pixel_acc_ab", "baseline/psnr_ba"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert len(client.get_metric_history(run.info.run_id, "loss/G/total")) >= 10
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert "samples/step0000010_ab.png" in artifacts
    loaded, located = load_generator("models:/cyclegan_facades-quick-ab/1", tracking_uri=mlflow_server.uri)
    assert loaded.direction == "ab" and located.run_id == run.info.run_id and loaded.size
    assert generate(loaded, loaded.build(), torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)

    resume = ["--resume", "facades-e2e", "--set", f"data.path={facades}", "train.steps=30",
              "eval.every=10", "checkpoint.every=10", "scaling.cpus_per_worker=0.5", "eval.max_images=16"]
    assert train_job.main(["--recipe", "cyclegan_facades-quick", *resume]) == 0
    (again,) = _runs(client, name="facades-e2e")  # the same run, not a second one
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "progress/resumed_from_step")
    assert [m.value for m in history] == [20.0]
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "loss/G/total")) == 30


@pytest.mark.parametrize("name", sorted(n for n in RECIPES if n.endswith("-quick")))
def test_every_quick_recipe_trains_evaluates_and_registers(name, real_ingests, home, tmp_path):
    """Each recipe for 4 steps without Ray, against the embedded sqlite store: its data, model,
    evaluation kind and registry all fit together."""
    dataset = RECIPES[name]().data.dataset
    sets = [f"data.path={real_ingests[dataset][0]}", "train.steps=4", "eval.every=2", "checkpoint.every=2",
            "eval.max_images=8", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.run_name=r"]
    assert train_job.main(["--recipe", name, "--no-ray", "--set", *sets]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = _runs(client)
    metrics = run.data.metrics
    expected = {"cogan": "test/pair_agreement", "cyclegan_mnist2mnistm": "test/label_acc_ab",
                "bicyclegan": "test/diversity"}
    key = next((v for k, v in expected.items() if name.startswith(k)), "test/psnr_ab")
    assert key in metrics and np.isfinite(metrics[key]), (key, sorted(metrics))
    if name.startswith("dualgan"):  # seed 000: train-mode metrics and the gap beside eval mode
        assert "test_train_mode/psnr_ab" in metrics and "test_gap/psnr_ab" in metrics
        # batch norm: served per image, with the running-statistics numbers and their gap beside
        assert "test_running_stats/psnr_ab" in metrics and "test_running_stats_gap/psnr_ab" in metrics
    versions = client.search_model_versions(f"name LIKE '{name}-%'")
    assert versions, "no generator was registered"


def test_missing_dataset_says_which_command_to_run(home, capsys, tmp_path):
    with pytest.raises(SystemExit, match="prepare_data.py"):
        train_job.main(["--recipe", "cyclegan_facades-quick", "--no-ray", "--set",
                        f"data.path={tmp_path}/nothing", f"data.source={tmp_path}/no-source"])


def test_bad_override_lists_the_valid_keys(home, capsys):
    assert train_job.main(["--recipe", "dualgan_facades", "--set", "model.nrom=batch"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'model.nrom'" in err and "model.norm" in err


def test_print_config_shows_resolved_absolute_paths(home, capsys):
    assert train_job.main(["--recipe", "dualgan_facades", "--print-config",
                           "--set", "model.norm=batch_renorm", "scaling.num_workers=2"]) == 0
    out = capsys.readouterr().out
    assert '"norm": "batch_renorm"' in out and '"num_workers": 2' in out
    assert str(home) in out and os.path.isabs(str(home))


def test_norm_study_logs_the_figure_and_the_train_eval_gap(facades_small_dst, home, tmp_path):
    """Seed 000 as a job: three DualGANs (dropout off, so only the norm can make a gap)."""
    import json

    from jobs import norm_study

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sets = [f"data.path={facades_small_dst}", "train.steps=4", "eval.every=0", "checkpoint.every=4",
            "eval.max_images=8", f"tracking.uri={uri}", "model.use_dropout=false", "tracking.register=false"]
    assert norm_study.main(["--no-ray", "--images", "2", "--set", *sets]) == 0
    client = MlflowClient(uri)
    runs = _runs(client)
    parent = next(r for r in runs if r.data.tags.get("study") == "norm")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.params["model.norm"] for r in children) == ["batch", "batch_renorm", "instance"]
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"norm_study_ab.png", "norm_study_ba.png", "norm_study.json"} <= files
    with open(client.download_artifacts(parent.info.run_id, "norm_study.json", str(tmp_path))) as f:
        table = json.load(f)
    assert table["instance"]["test_gap/l1_ab"] < 1e-6 < table["batch"]["test_gap/l1_ab"]
