"""pipeline.tracking and pipeline.registry against a real `mlflow server` (tests/mlflow_server.py)
and the embedded store."""

import dataclasses
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from safetensors.torch import save_file
from tiny import tiny_model

from models import MODELS
from pipeline import registry, served_generator, session, tracking
from pipeline.config import flatten
from pipeline.generator_artifact import GeneratorArtifact
from pipeline.model_ref import parse_model_ref
from pipeline.run_config import TrackingSettings, make_config

pytestmark = pytest.mark.integration


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def new_run(uri, **kwargs):
    return tracking.create_run(uri, unique("test"), "run", params=kwargs.pop("params", {}),
                               tags=kwargs.pop("tags", {}), **kwargs)


def example(cfg, n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, cfg.channels_a, size, size, generator=g) * 2 - 1).numpy()


def log_tiny(tracker, name="cyclegan", direction="ab", registered_name=None, metrics=None, **overrides):
    spec, cfg, nets, _ = tiny_model(name, **overrides)
    net_name = spec.generator_for[direction]
    x = torch.randn(2, cfg.nz) if name == "cogan" else torch.from_numpy(example(cfg))
    artifact = GeneratorArtifact.from_net(name, cfg, direction, nets[net_name], 32, False)
    info = tracker.log_generator(artifact, x.numpy(), registered_name, metrics)
    return info, cfg, nets[net_name].eval(), x


def load(ref, uri=None):
    """(artifact, where it was found, its net)."""
    artifact, located = registry.load_generator(ref, uri)
    return artifact, located, artifact.build()


def served(artifact, x):
    """What the served model gives for `x`."""
    return served_generator.generate(artifact, artifact.build(), x)


def test_create_run_logs_dotted_params_and_tags(mlflow_server):
    _, cfg, _, _ = tiny_model("cyclegan")
    params = {**{f"model.{k}": v for k, v in flatten(cfg).items()}, "optim.lr": 2e-4,
              "notes.long": "x" * 7000, **{f"extra.p{i:03d}": i for i in range(120)}}  # > 100: batched
    run_id = new_run(mlflow_server.uri, params=params, tags={"recipe": "tiny"})
    run = MlflowClient(mlflow_server.uri).get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.tags["recipe"] == "tiny"
    assert run.data.params["model.lambda_cycle"] == "10.0"
    assert run.data.params["model.betas"] == "(0.5, 0.999)"
    assert run.data.params["extra.p119"] == "119"
    assert 0 < len(run.data.params["notes.long"]) <= 6000 and run.data.params["notes.long"].startswith("xxx")


def test_nested_run_has_parent_tag(mlflow_server):
    parent = new_run(mlflow_server.uri)
    child = new_run(mlflow_server.uri, parent_run_id=parent)
    assert MlflowClient(mlflow_server.uri).get_run(child).data.tags["mlflow.parentRunId"] == parent


def test_tracker_reattaches_to_one_run_and_logs_metric_history(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    run_id = new_run(mlflow_server.uri, params={"optim.lr": 1e-3})
    tracker = tracking.Tracker(mlflow_server.uri, run_id)
    for step in range(3):
        tracker.log_metrics({"loss/G/total": 1.0 / (step + 1), "loss/D/nan": float("nan")}, step)
    with pytest.raises(MlflowException):
        tracking.Tracker(mlflow_server.uri, uuid.uuid4().hex)  # an unknown run is an error, not a new run
    tracker.end("KILLED")  # a worker dies...
    again = tracking.Tracker(mlflow_server.uri, run_id)  # ...and its replacement reattaches
    assert client.get_run(run_id).info.status == "RUNNING"
    again.log_params({"optim.lr": 1e-3})  # the same value again is accepted
    again.log_metrics({"loss/G/total": 0.2, "eval/psnr_ab": np.float32(21.5)}, step=3)
    again.end()

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert [m.step for m in client.get_metric_history(run_id, "loss/G/total")] == [0, 1, 2, 3]
    assert "loss/D/nan" not in run.data.metrics
    assert run.data.metrics["eval/psnr_ab"] == pytest.approx(21.5)


def test_tracker_logs_images_and_artifacts(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.uri)
    tracker = tracking.Tracker(mlflow_server.uri, new_run(mlflow_server.uri))
    tracker.log_image(torch.rand(3, 12, 10) * 2 - 1, "samples/step00100_ab.png")
    tracker.log_image(torch.rand(1, 12, 10) * 2 - 1, "samples/step00100_gray.png")
    tracker.log_dict({"model": {"ngf": 4}}, "config.json")
    tracker.log_text("hello", "notes/readme.txt")
    tracker.set_tags({"phase": "test"})

    assert {a.path for a in client.list_artifacts(tracker.run_id, "samples")} == {
        "samples/step00100_ab.png", "samples/step00100_gray.png"}
    png = client.download_artifacts(tracker.run_id, "samples/step00100_ab.png", str(tmp_path))
    from PIL import Image
    with Image.open(png) as img:
        assert (img.format, img.mode, img.size) == ("PNG", "RGB", (10, 12))
    assert {a.path for a in client.list_artifacts(tracker.run_id)} >= {"config.json", "notes", "samples"}
    assert client.get_run(tracker.run_id).data.tags["phase"] == "test"


def test_log_generator_registers_a_pickle_free_model_that_loads_back(mlflow_server, monkeypatch):
    uri, name = mlflow_server.uri, unique("tiny-cyclegan")
    tracker = registry.ModelTracker(uri, new_run(uri))
    info, _, net, x = log_tiny(tracker, registered_name=name, metrics={"eval/psnr_ab": 12.5})
    assert (info["name"], info["version"], info["model_uri"]) == (name, "1", f"models:/{name}/1")
    with torch.no_grad():
        expected = net(x)

    loaded, located, loaded_net = load(f"models:/{name}/1", uri)
    assert (loaded.model_name, loaded.direction, loaded.net_name) == ("cyclegan", "ab", "G_ab")
    assert (located.version, located.run_id) == ("1", tracker.run_id)
    assert (loaded.size, loaded.swap_ab, loaded.channels) == (32, False, (3, 3))  # recorded, not from params
    assert isinstance(loaded.config, MODELS["cyclegan"].Config) and loaded.config.ngf == 4
    assert not loaded_net.training
    for key, value in net.state_dict().items():
        assert torch.equal(loaded_net.state_dict()[key], value), key
    assert torch.equal(served(loaded, x), expected)
    assert registry.get_model_version_metrics(uri, name, 1) == {"eval/psnr_ab": 12.5}

    # the model holds source and data only: no pickle anywhere in it
    location = MlflowClient(uri).get_model_version_download_uri(name, "1")
    files = {p.name for p in Path(mlflow.artifacts.download_artifacts(location, tracking_uri=uri)).rglob("*")}
    assert {"served_model.py", "served_generator.py", "generator_artifact.py", "generator.json",
            "generator.safetensors", "MLmodel"} <= files
    assert not {f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth"))}

    # mlflow's own loader resolves models:/ through the global URIs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/1")
    assert np.allclose(pyfunc.predict(x.numpy()), expected.numpy(), atol=1e-6)
    assert pyfunc.predict(example(loaded.config, n=1, size=64)).shape == (1, 3, 64, 64)  # any size

    # a second version, then the alias moves to it
    second, _, net_ba, _ = log_tiny(tracker, direction="ba", registered_name=name)
    assert second["version"] == "2"
    registry.set_alias(uri, name, "champion", 1)
    assert load(f"models:/{name}@champion", uri)[1].version == "1"
    registry.set_alias(uri, name, "champion", 2)
    by_alias, located, _ = load(f"{name}@champion", uri)  # the short form parses the same
    assert (located.version, by_alias.net_name) == ("2", "G_ba")
    assert torch.equal(served(by_alias, x), net_ba(x).detach())
    assert load(name, uri)[1].version == "2"  # NAME: its latest version
    assert load(f"models:/{info['model_id']}", uri)[0].net_name == "G_ab"
    assert load(f"runs:/{tracker.run_id}/generator_ab", uri)[0].net_name == "G_ab"
    with pytest.raises(registry.ModelNotFound, match="no version '7'"):
        load(f"models:/{name}/7", uri)


def test_served_bicyclegan_and_cogan(mlflow_server, monkeypatch):
    uri = mlflow_server.uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = registry.ModelTracker(uri, new_run(uri))

    info, cfg, net, x = log_tiny(tracker, "bicyclegan")
    served = mlflow.pyfunc.load_model(info["model_uri"])
    zero = served.predict(x.numpy())
    with torch.no_grad():
        assert np.allclose(zero, net(x, torch.zeros(2, cfg.nz)).numpy(), atol=1e-6)  # z = 0 by default
    seeded = served.predict(x.numpy(), params={"z_seed": 3})
    assert np.array_equal(seeded, served.predict(x.numpy(), params={"z_seed": 3}))
    assert not np.allclose(seeded, zero)

    info, _, _, z = log_tiny(tracker, "cogan", direction="pair")
    pair = mlflow.pyfunc.load_model(info["model_uri"]).predict(z.numpy())
    assert pair.shape == (2, 2, 32, 32)  # channels_a + channels_b, stacked along channels


def test_generator_logged_before_the_rate_moved_loads(tmp_path):
    """A generator.json written by the code before optim.lr (its model config holds `lr`)."""
    old = Path(__file__).parent / "assets" / "old_config" / "generator.json"
    (tmp_path / registry.SPEC_FILE).write_text(old.read_text())
    spec, cfg, nets, _ = tiny_model("cyclegan")  # the same widths as the old file's
    save_file({k: v.contiguous() for k, v in nets["G_ab"].state_dict().items()},
              str(tmp_path / registry.WEIGHTS_FILE))
    loaded, _, _ = load(str(tmp_path))
    assert loaded.config == cfg and served(loaded, torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_generator_logged_before_the_artifact_takes_size_and_swap_from_its_run(mlflow_server, tmp_path):
    """A generator.json as the code before GeneratorArtifact wrote it (no image_size, no swap_ab):
    both come from the run that logged it, read from its params as that code did."""
    uri = mlflow_server.uri
    spec, cfg, nets, _ = tiny_model("cyclegan")
    old = {"model": "cyclegan", "config": dataclasses.asdict(cfg), "direction": "ba", "net": "G_ba"}
    (tmp_path / registry.SPEC_FILE).write_text(json.dumps(old))
    save_file({k: v.contiguous() for k, v in nets["G_ba"].state_dict().items()},
              str(tmp_path / registry.WEIGHTS_FILE))
    run_id = new_run(uri, params={"data.crop_size": 48, "data.load_size": 56, "data.swap_ab": True})
    located = registry.Located(parse_model_ref(str(tmp_path)), str(tmp_path), None, run_id)
    artifact, _ = registry.load_generator(located, uri)
    assert (artifact.size, artifact.swap_ab, artifact.reads_half()) == (48, True, "left")
    assert load(str(tmp_path))[0].size is None  # no run: the caller passes --size


def test_null_tracker_does_nothing():
    def tracker_for(rank, run_id):
        return session.open_tracker(make_config("cyclegan", tracking=TrackingSettings(
            uri="http://127.0.0.1:9", run_id=run_id)), rank)

    null = tracker_for(1, "no-such-run")  # nothing is contacted
    assert isinstance(null, session.NullTracker)
    public = [n for n in dir(registry.ModelTracker) if not n.startswith("_")]
    for name in public:
        assert getattr(null, name)("anything", step=1) is None
    with pytest.raises(AttributeError):
        null.not_a_tracker_method  # noqa: B018
    assert isinstance(tracker_for(0, ""), session.NullTracker)  # tracking off


def test_embedded_default_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # anything written to the working dir would show up here
    home = tmp_path / "home"
    assert tracking.resolve_tracking_uri("http://x:5000", str(home)) == "http://x:5000"
    uri = tracking.resolve_tracking_uri(None, "home")  # relative: made absolute
    assert uri == f"sqlite:///{home}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking.resolve_tracking_uri(None, str(home)) == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    run_id = tracking.create_run(uri, "facades", "run", params={"model.ngf": 4}, tags={}, home=str(home))
    tracker = registry.ModelTracker(uri, run_id)
    tracker.log_metrics({"loss/G/total": 1.0}, step=0)
    tracker.log_image(torch.zeros(3, 4, 4), "samples/step00000_ab.png")
    _, _, net, x = log_tiny(tracker, registered_name="tiny")
    tracker.end()

    assert MlflowClient(uri).get_experiment_by_name("facades").artifact_location == \
        tracking.default_artifact_location(str(home), "facades")
    assert list((home / "mlartifacts" / "facades").glob("*/artifacts/samples/step00000_ab.png"))
    assert torch.equal(served(load("models:/tiny/1", uri)[0], x), net(x).detach())
    model_dir = next((home / "mlartifacts" / "facades" / "models").glob("*/artifacts"))
    assert torch.equal(served(load(str(model_dir))[0], x), net(x).detach())  # a local dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # no ./mlruns, no ./mlflow.db


def test_importing_the_mlflow_modules_changes_no_environment():
    """Telemetry is switched off by the entry points (pipeline.launch.quiet), not as a side effect
    of importing a library module."""
    code = ("import os; os.environ.pop('MLFLOW_DISABLE_TELEMETRY', None); before = dict(os.environ); "
            "import pipeline.tracking, pipeline.registry, pipeline.served_generator; "
            "print(sorted(set(os.environ.items()) ^ set(before.items())))")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_DISABLE_TELEMETRY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# ----------------------------------------------------------------------------- a tiny tracked training


@pytest.fixture(scope="module")
def tracked_run(facades_small_dst, tmp_path_factory):
    """Two steps of tiny CycleGAN without Ray, its generators logged (not registered), in SQLite."""
    from runs import tiny_run

    from pipeline import launch, loop
    from pipeline.data import read_manifest

    tmp = tmp_path_factory.mktemp("tracked_run")
    cfg = tiny_run(tmp, facades_small_dst, steps=2, every=2)
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(
        cfg.tracking, uri=f"sqlite:///{tmp}/mlflow.db", log_models=True, register=False))
    manifest = read_manifest(facades_small_dst)
    cfg = launch.start_tracking(cfg, manifest)
    loop.run_plain(cfg)
    return MlflowClient(cfg.tracking.uri), cfg.tracking.run_id, manifest


def test_final_metrics_are_logged_at_the_final_step_only(tracked_run):
    client, run_id, _ = tracked_run
    metrics = client.get_run(run_id).data.metrics
    finals = [k for k in metrics if k.startswith(("eval/", "test/"))]
    assert finals
    for key in finals:  # the generators' metrics at step 0 once made every curve start at its end
        assert {m.step for m in client.get_metric_history(run_id, key)} == {2}, key


def test_training_run_carries_its_dataset_and_a_description(tracked_run, facades_small_dst):
    client, run_id, manifest = tracked_run
    run = client.get_run(run_id)
    (given,) = run.inputs.dataset_inputs
    assert given.dataset.digest == manifest["content_hash"][:36]
    assert json.loads(given.dataset.profile) == manifest["counts"]
    assert json.loads(given.dataset.source) == {"uri": manifest["source"]}
    note = run.data.tags["mlflow.note.content"]
    assert "test-cyclegan" in note and manifest["content_hash"][:12] in note


def test_sample_grids_have_tiles_of_at_least_128_px(tracked_run, tmp_path):
    from PIL import Image

    client, run_id, _ = tracked_run
    grid = Image.open(client.download_artifacts(run_id, "samples/step0000002_ab.png", str(tmp_path)))
    rows, columns = 2, 3  # eval.grid_rows; input | output | reconstruction
    assert (grid.height - 2) // rows - 2 >= 128 and (grid.width - 2) // columns - 2 >= 128, grid.size
    pixels = np.asarray(grid)
    assert (pixels[2:130:4, 2:130:4] == pixels[3:131:4, 3:131:4]).all()  # nearest: 4×4 blocks of one colour


# ----------------------------------------------------------------------------- datasets attached at once


def test_runs_attaching_one_dataset_at_the_same_moment_all_get_it(mlflow_server):
    """A search's trials attach the same dataset together; MLflow refuses the slower insert of the
    dataset row (BAD_REQUEST, UNIQUE constraint). Before the retry about half of these pairs lost
    one run's dataset (and the trial failed)."""
    import threading

    client = MlflowClient(mlflow_server.uri)
    manifest = {"content_hash": uuid.uuid4().hex, "counts": {"train": {"a": 4, "b": 4}}, "source": "/data/x"}
    for _ in range(8):
        experiment = client.create_experiment(unique("race"))
        runs = [client.create_run(experiment).info.run_id for _ in range(2)]
        barrier, errors = threading.Barrier(len(runs)), []

        def attach(run_id, barrier=barrier, errors=errors):
            barrier.wait()
            try:
                tracking.log_dataset(mlflow_server.uri, run_id, manifest, "facades")
            except MlflowException as error:
                errors.append(error)

        threads = [threading.Thread(target=attach, args=(run_id,)) for run_id in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        assert [len(client.get_run(r).inputs.dataset_inputs) for r in runs] == [1, 1]


def test_a_trial_run_found_again_gets_its_dataset_once(mlflow_server, facades_small_dst, tmp_path):
    """A trial that stopped between creating its run and attaching the dataset, then restarted,
    finds its run; the run then carries the dataset, and only once however often it is found."""
    from runs import tiny_run

    from pipeline.data import read_manifest
    from pipeline.search import trial_run_id

    cfg = tiny_run(tmp_path, facades_small_dst, steps=2, every=2)
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(
        cfg.tracking, uri=mlflow_server.uri, experiment=unique("trials")))
    search_name = unique("search")
    first = tracking.create_run(mlflow_server.uri, cfg.tracking.experiment, "t0", params={},
                                tags={"tune.trial_id": "t_00000", "tune.search": search_name})
    for _ in range(2):
        assert trial_run_id(cfg, "t_00000", search_name) == first
    (given,) = MlflowClient(mlflow_server.uri).get_run(first).inputs.dataset_inputs
    assert given.dataset.digest == read_manifest(facades_small_dst)["content_hash"][:36]
