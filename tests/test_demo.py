"""`make demo` (jobs/demo.py) runs the real flow: ingest, a Ray Train run tracked in MLflow, a nested
search, the promotion gate, batch translation through @production, and a closing summary. Here its
functions run with tiny settings (few steps, tiny widths, 2 trials), so that the flow cannot rot."""

import dataclasses
import os

import pytest

from jobs import demo

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_TRAIN = ["train.max_minutes=0", "train.steps=4", "train.batch_size=2", "eval.every=2",
              "checkpoint.every=2", "eval.max_images=8", "model.ngf=4", "model.ndf=4", "model.n_blocks=1"]
TINY_SUBSET = {"trainA": 40, "trainB": 40, "testA": 10, "testB": 10}


@pytest.fixture
def demo_env(monkeypatch):
    """The demo sets these for its own process; the test gives them back afterwards."""
    for key in ("TRANSMUTE_HOME", "MLFLOW_TRACKING_URI", "RAY_ADDRESS",
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "MLFLOW_LOGGING_LEVEL"):
        monkeypatch.delenv(key, raising=False)


def test_demo_runs_the_whole_flow(tmp_path, ray_cluster, demo_env, capfd):
    s = demo.Settings(out=str(tmp_path), train_minutes=None, train_set=TINY_TRAIN, search_trials=2,
                      search_steps=4, subset=TINY_SUBSET, translate_images=3, source=demo.SAMPLE, gate=0.0)
    lines = demo.run(s)
    printed = capfd.readouterr()
    assert "Trial status" not in printed.out + printed.err  # the search runs without Tune's live table

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/home/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("transmute").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    trained = by_name[f"demo-train-{s.stamp}"]
    assert trained.info.status == "FINISHED" and "test/label_acc_ba" in trained.data.metrics
    parent = by_name[f"demo-search-{s.stamp}"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.data.tags["tune.role"] == "parent" and len(trials) == 2

    version = client.get_model_version_by_alias(f"{demo.MODEL}-{demo.DIRECTION}", "production")
    assert version.run_id == trained.info.run_id

    # a bound no model passes: the gate refuses, and the demo goes on with the latest version, saying so
    refused = demo.promote(dataclasses.replace(s, gate=1.5), {"test/label_acc_ba": 0.5})
    assert not refused["promoted"] and refused["model"] == f"{demo.MODEL}-{demo.DIRECTION}"

    translated = sorted(p.name for p in (tmp_path / f"translated-{s.stamp}").glob("*.png"))
    assert translated == sorted(os.listdir(tmp_path / "translate_in")) and len(translated) == 3
    assert (tmp_path / f"translated-{s.stamp}.png").is_file()

    text = "\n".join(lines)
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/home/mlflow.db --port 5000" in text
    assert "workflowType=machine_learning" in text and "Model training" in text
    assert "test/label_acc_ba" in text and "floor" in text
