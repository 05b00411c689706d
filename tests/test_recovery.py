"""Recovery: corrupt checkpoints are named and skipped, a checkpoint Ray did not register yet is
resumed from, and a translation rerun with nothing new succeeds although an input is unreadable."""

import os

import numpy as np
import pytest
import ray.train
import torch
from mlflow import MlflowClient
from PIL import Image
from runs import checkpoint_dir, tiny_run

from jobs import train as train_job
from jobs import translate as translate_job
from models import MODELS
from pipeline import checkpoint as ckpt
from pipeline.run_config import to_json
from pipeline.trainee import build_trainee, make_schedulers
from pipeline.translate import load_output_index

pytestmark = pytest.mark.usefixtures("one_thread")


def truncate(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def write_checkpoint(cfg, step: int) -> str:
    """A checkpoint of fresh tiny nets at `step`, as the loop writes it (rank 0 of 1), no training."""
    spec = MODELS[cfg.model_name]
    nets = spec.build_nets(cfg.model)
    optimizers = spec.make_optimizers(cfg.model, nets, cfg.optim.lr)
    progress = {"step": step, "epoch": 0, "batch": step, "steps": 0}
    directory = checkpoint_dir(cfg, step)
    parts = ckpt.Parts(nets, optimizers, make_schedulers(cfg, optimizers), {}, progress)
    ckpt.save(directory, parts, rank=0, config_json=to_json(cfg))
    ckpt.write_meta(directory, {**progress, "run_id": "", "world_size": 1, "model": cfg.model_name})
    return directory


# ============================================================================= corrupt checkpoints


@pytest.mark.parametrize("bad", ["nets.safetensors", "train.pt"])
def test_resume_skips_a_truncated_newest_checkpoint_and_a_failed_resume_keeps_finished(
        bad, facades_small_dst, tmp_path, monkeypatch, capfd):
    """jobs/train.py --resume: the newest checkpoint truncated -> resumed from the older one, with a
    warning naming the file; every checkpoint truncated -> one error line naming a file, and the
    finished MLflow run stays FINISHED."""
    monkeypatch.setenv("TRANSMUTE_HOME", str(tmp_path / "home"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sets = [f"data.path={facades_small_dst}", "eval.every=0", "checkpoint.every=1", "eval.max_images=4",
            f"tracking.uri={uri}", "tracking.log_models=false", "tracking.register=false",
            "model.ngf=4", "model.ndf=4", "model.n_blocks=1", "train.log_every=1"]
    assert train_job.main(["--recipe", "cyclegan_facades-quick", "--no-ray", "--set", *sets,
                           "tracking.run_name=r", "train.steps=2"]) == 0
    runs = tmp_path / "home" / "runs" / "r"
    assert sorted(os.listdir(runs)) == ["checkpoint_00000001", "checkpoint_00000002"]  # keep defaults to 2
    truncate(runs / "checkpoint_00000002" / bad)
    capfd.readouterr()

    resume = ["--recipe", "cyclegan_facades-quick", "--no-ray", "--resume", "r", "--set", *sets]
    assert train_job.main([*resume, "train.steps=3"]) == 0
    assert str(runs / "checkpoint_00000002" / bad) in capfd.readouterr().err
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("transmute").experiment_id])
    history = client.get_metric_history(run.info.run_id, "progress/resumed_from_step")
    assert [m.value for m in history] == [1.0] and run.info.status == "FINISHED"

    for name in os.listdir(runs):
        truncate(runs / name / bad)
    assert train_job.main([*resume, "train.steps=4"]) == 3  # storage: every checkpoint is corrupt
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: corrupt checkpoint file") and bad in err[-1]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_translate_from_a_corrupt_checkpoint_names_the_file(tmp_path, capfd):
    cfg = tiny_run(tmp_path, str(tmp_path / "data"))
    older, newer = write_checkpoint(cfg, 1), write_checkpoint(cfg, 2)
    truncate(os.path.join(newer, "nets.safetensors"))
    images = tiny_images(tmp_path / "in", 1)
    args = ["--input", images, "--no-ray", "--no-progress"]
    assert translate_job.main(["--model", newer, *args, "--output", str(tmp_path / "a")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: corrupt checkpoint file")
    assert os.path.join(newer, "nets.safetensors") in err[0]
    run_folder = os.path.dirname(newer)  # a run folder: its newest intact checkpoint, with a warning
    assert translate_job.main(["--model", run_folder, *args, "--output", str(tmp_path / "b")]) == 0
    assert os.path.join(newer, "nets.safetensors") in capfd.readouterr().err
    index = load_output_index(str(tmp_path / "b"))
    assert {e["model_version"] for e in index["entries"].values()} == {os.path.basename(older)}


def test_a_checkpoint_missing_a_rank_is_not_intact(tmp_path):
    """Ray merges every rank's folder into one: a rank's part that never arrived is noticed."""
    cfg = tiny_run(tmp_path, str(tmp_path / "data"))
    directory = write_checkpoint(cfg, 1)
    ckpt.write_meta(directory, {"step": 1, "world_size": 2})  # rank 1 wrote no digests
    with pytest.raises(ckpt.CorruptCheckpoint, match="digests-rank1.json"):
        ckpt.verify(directory)


# ============================================================================= Ray's record vs storage


def ray_session(cfg, monkeypatch, recorded):
    """A RaySession as a restarted Ray Train worker has it, Ray's record of its checkpoint given."""
    from pipeline.session import RaySession

    session = RaySession.__new__(RaySession)
    session.cfg, session.rank, session.world, session.device = cfg, 0, 1, torch.device("cpu")
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: recorded)
    return session


@pytest.mark.parametrize("recorded_step", [None, 1])
def test_ray_worker_resumes_from_a_newer_checkpoint_ray_did_not_register(tmp_path, monkeypatch,
                                                                          recorded_step):
    """A worker killed after writing checkpoint 2 but before Ray registered it: Ray's record says
    step 1 (or nothing); the restarted worker resumes at step 2, not from 1 or 0."""
    cfg = tiny_run(tmp_path, str(tmp_path / "data"))
    write_checkpoint(cfg, 1), write_checkpoint(cfg, 2)
    recorded = ray.train.Checkpoint(checkpoint_dir(cfg, recorded_step)) if recorded_step else None
    session = ray_session(cfg, monkeypatch, recorded)
    trainee = build_trainee(cfg, MODELS[cfg.model_name], cfg.model, session)
    assert trainee.progress.step == 2 and trainee.resumed_from == 2


def test_ray_worker_skips_a_corrupt_registered_checkpoint(tmp_path, monkeypatch, capfd):
    cfg = tiny_run(tmp_path, str(tmp_path / "data"))
    write_checkpoint(cfg, 1), write_checkpoint(cfg, 2)
    truncate(os.path.join(checkpoint_dir(cfg, 2), "rank0.pt"))
    session = ray_session(cfg, monkeypatch, ray.train.Checkpoint(checkpoint_dir(cfg, 2)))
    trainee = build_trainee(cfg, MODELS[cfg.model_name], cfg.model, session)
    assert trainee.progress.step == 1
    assert os.path.join(checkpoint_dir(cfg, 2), "rank0.pt") in capfd.readouterr().err


# ============================================================================= translation reruns


def tiny_images(folder, n: int, seed: int = 0) -> str:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return str(folder)


def test_translation_rerun_with_unreadable_inputs_succeeds_and_lists_them(tmp_path, capfd):
    """Inputs that cannot be read (named like images: a dangling link, unreadable by root too, and a
    fifo, which must not block the run) are rejected once by their path, so a rerun with nothing
    new exits 0; one readable again is translated."""
    cfg = tiny_run(tmp_path, str(tmp_path / "data"))
    model = write_checkpoint(cfg, 1)
    images = tiny_images(tmp_path / "in", 3)
    os.symlink(tmp_path / "nowhere.png", os.path.join(images, "gone.png"))
    os.mkfifo(os.path.join(images, "pipe.png"))
    args = ["--model", model, "--input", images, "--output", str(tmp_path / "out"), "--no-ray",
            "--no-progress"]
    assert translate_job.main(args) == 0
    assert translate_job.main(args) == 0
    out = capfd.readouterr().out
    assert "translated 0 of 0 outputs" in out and "0 now, 2 before" in out
    index = load_output_index(str(tmp_path / "out"))
    assert len(index["entries"]) == 3
    reasons = {r["input_id"]: r["reason"] for r in index["rejected"].values()}
    assert sorted(reasons) == ["gone.png", "pipe.png"]
    assert "No such file" in reasons["gone.png"] and "not a regular file" in reasons["pipe.png"]

    tiny_images(tmp_path / "more", 1, seed=1)
    os.replace(tmp_path / "more" / "0.png", tmp_path / "nowhere.png")  # the link's target appears
    assert translate_job.main(args) == 0
    index = load_output_index(str(tmp_path / "out"))
    assert len(index["entries"]) == 4 and [r["input_id"] for r in index["rejected"].values()] == ["pipe.png"]
