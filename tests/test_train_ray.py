"""Ray Train runs: data parallelism is exact, checkpoints merge every rank's state, and a worker
killed with SIGKILL mid-run is replaced and the run resumes from its last checkpoint."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from runs import checkpoint_dir, tiny_run
from safetensors.torch import load_file

from models import MODELS
from pipeline import launch
from pipeline.launch import previous_run
from pipeline.loop import ray_trainer, run_plain
from pipeline.run_config import override

pytestmark = pytest.mark.integration


def _weights(cfg, step):
    return load_file(os.path.join(checkpoint_dir(cfg, step), "nets.safetensors"))


def test_two_workers_match_one_worker_with_the_global_batch(tmp_path, facades_small_dst, ray_cluster):
    """2 workers × batch 1 (gradients averaged) == 1 process × batch 2: the same samples (data order
    is by position), instance norm and no image pool, so the averaged gradient is the batch gradient.
    The G step freezes D; BicycleGAN-style extra gradients would be averaged the same way."""
    common = dict(steps=4, every=4, pool_size=0)
    plain = tiny_run(tmp_path, facades_small_dst, "cyclegan", name="one", batch_size=2, **common)
    run_plain(plain)
    ray_cfg = tiny_run(tmp_path, facades_small_dst, "cyclegan", name="two", batch_size=1, reader="ray",
                       **common)
    ray_cfg = override(ray_cfg, {"scaling.num_workers": 2, "scaling.cpus_per_worker": 0.5})
    result = ray_trainer(ray_cfg).fit()
    assert result.error is None
    files = set(os.listdir(checkpoint_dir(ray_cfg, 4)))
    assert {"nets.safetensors", "train.pt", "rank0.pt", "rank1.pt", "meta.json", "config.json"} <= files
    one, two = _weights(plain, 4), _weights(ray_cfg, 4)
    # Compare what the nets compute: conv biases in front of instance norm have a zero gradient in
    # exact arithmetic, so Adam turns their float noise into ±lr steps that change no output.
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    initial, after_one, after_two = (_outputs(plain.model, w, x) for w in (None, one, two))
    moved = max((after_one[k] - initial[k]).abs().max().item() for k in initial)
    worst = max((after_one[k] - after_two[k]).abs().max().item() for k in initial)
    assert moved > 1e-3 and worst < 1e-4, (moved, worst)


def _outputs(model_cfg, weights, x):
    torch.manual_seed(0)  # the run's seed: the initial weights when `weights` is None
    nets = MODELS["cyclegan"].build_nets(model_cfg)
    if weights is not None:
        nets.load_state_dict(weights)
    with torch.no_grad():
        return {k: nets[k](x) for k in nets}


def _kill_a_worker_after_first_checkpoint(cfg, killed: dict):
    """Kill once Ray's controller has registered a checkpoint (its snapshot names one): a file on
    disk alone is not enough, since a restart resumes only from what the controller registered.
    """
    deadline = time.time() + 180
    while time.time() < deadline and _registered_checkpoint(cfg) is None:
        time.sleep(0.05)
    workers = train_worker_pids()
    if workers and _registered_checkpoint(cfg) is not None:
        os.kill(workers[-1], signal.SIGKILL)
        killed["pid"], killed["at"], killed["after"] = workers[-1], time.time(), _registered_checkpoint(cfg)


def _registered_checkpoint(cfg) -> str | None:
    """The latest checkpoint in Ray Train's checkpoint-manager snapshot (written after it
    registers a reported checkpoint), or None while there is none."""
    path = os.path.join(cfg.storage.path, cfg.tracking.run_name, "checkpoint_manager_snapshot.json")
    try:
        with open(path) as f:
            latest = json.load(f).get("latest_checkpoint_result")
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return None
    return latest and latest.get("checkpoint_dir_name")


def train_worker_pids() -> list[int]:
    """Ray names each actor's process after its class (ray::RayTrainWorker...); oldest first."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline", "create_time", "status"]):
        named = any("RayTrainWorker" in part for part in p.info["cmdline"] or [])
        if named and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append((p.info["create_time"], p.info["pid"]))
    return [pid for _, pid in sorted(found)]


def test_sigkilled_worker_is_replaced_and_the_run_resumes(tmp_path, facades_small_dst, ray_cluster):
    cfg = tiny_run(tmp_path, facades_small_dst, "cyclegan", name="ft", steps=200, every=20, batch_size=2)
    cfg = override(cfg, {"scaling.num_workers": 2, "scaling.cpus_per_worker": 0.5, "scaling.max_failures": 2})
    killed = {}
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint, args=(cfg, killed), daemon=True)
    killer.start()
    result = ray_trainer(cfg).fit()
    killer.join(timeout=5)
    assert killed, "no training worker of this run was found to kill after a registered checkpoint"
    assert result.error is None
    with open(os.path.join(checkpoint_dir(cfg, 200), "meta.json")) as f:
        meta = json.load(f)
    assert meta["step"] == 200 and meta["world_size"] == 2
    assert result.metrics["step"] == 200
    resumed = result.metrics.get("progress/resumed_from_step")
    registered = int(killed["after"].rsplit("_", 1)[1])  # checkpoint_00000040 -> 40
    assert resumed is not None and resumed >= registered >= 20, (killed, result.metrics)


def test_data_and_checkpoints_on_s3(tmp_path, s3_env, facades_small_dst, ray_cluster):
    """A real S3 server (SeaweedFS) holds both the dataset and the run's checkpoints; 14 steps of
    11 per epoch, so the worker reads the second epoch ahead from S3 while training the first."""
    from fixtures_data import FACADES_SMALL

    from pipeline import data, storage

    bucket = s3_env.make_bucket("train-on-s3")
    data.ingest(str(FACADES_SMALL), f"{bucket}/facades", data.IngestOptions(shard_rows=8), progress=False)
    cfg = tiny_run(tmp_path, f"{bucket}/facades", "cyclegan", name="s3run", steps=14, every=7, reader="ray")
    cfg = override(cfg, {"storage.path": f"{bucket}/runs", "scaling.cpus_per_worker": 0.5})
    result = ray_trainer(cfg).fit()
    assert result.error is None and result.metrics["step"] == 14
    files = storage.list_files(f"{bucket}/runs/s3run/checkpoint_00000014")
    assert {"nets.safetensors", "train.pt", "rank0.pt", "meta.json", "config.json"} <= set(files)
    assert result.checkpoint is not None and result.checkpoint.path.endswith("checkpoint_00000014")
    meta = json.loads(storage.read_bytes(f"{bucket}/runs/s3run/checkpoint_00000014/meta.json"))
    assert (meta["epoch"], meta["batch"]) == (1, 3)
    # `train.py --resume s3run` finds the run's newest checkpoint on S3; Ray continues from it
    assert previous_run(cfg, "s3run")["step"] == 14
    result = ray_trainer(override(cfg, {"train.steps": 21})).fit()
    assert result.error is None and result.metrics["step"] == 21
    assert result.metrics["progress/resumed_from_step"] == 14
    with pytest.raises(SystemExit, match="no complete checkpoint under s3://train-on-s3/runs/nothere"):
        previous_run(cfg, "nothere")


def test_a_worker_runs_as_many_torch_threads_as_its_cpus(tmp_path, facades_small_dst, ray_cluster):
    """A driver's OMP_NUM_THREADS reaches a local Ray's workers (here forced through the runtime env);
    the loop must still use the CPUs the worker holds, not 1."""
    cfg = tiny_run(tmp_path, facades_small_dst, "cyclegan", name="threads", steps=1, every=1, batch_size=1)
    cfg = override(cfg, {"scaling.cpus_per_worker": 2})
    seen = tmp_path / "threads.txt"

    def threads_seen(cfg, rank):  # a local function: Ray pickles it by value (tests/ is no package)
        from pipeline.session import NullTracker

        seen.write_text(str(torch.get_num_threads()))
        return NullTracker()

    trainer = ray_trainer(cfg, make_tracker=threads_seen)
    trainer.run_config.worker_runtime_env["env_vars"]["OMP_NUM_THREADS"] = "1"
    result = trainer.fit()
    assert result.error is None
    assert seen.read_text() == "2"


LOCAL_RAY_PROBE = """
import os
from ray._private.ray_constants import env_bool
from ray.train.v2._internal.constants import ENABLE_PREEMPTION_WATCHER_ENV_VAR as WATCHER
from pipeline import launch
ray = launch.init_ray(None, 1)
seen = ray.remote(lambda: (os.nice(0), env_bool(WATCHER, True))).options(num_cpus=0).remote()
print(*ray.get(seen), os.environ.get("RAY_worker_niceness"), os.environ.get(WATCHER))
"""


def test_a_local_ray_started_by_a_job_runs_its_workers_at_niceness_0_without_preemption_watcher():
    """Ray's default worker niceness (15) leaves a training worker the last share of a busy machine;
    a job's own local Ray starts them at 0. Train V2's preemption watcher (an actor polling for
    drained nodes) is off there, as Ray's controller reads it. The driver's environment is left as
    it was."""
    drop = ("RAY_ADDRESS", *launch.LOCAL_RAY_ENV)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    out = subprocess.run([sys.executable, "-c", LOCAL_RAY_PROBE], env=env, capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-4:] == ["0", "False", "None", "None"]
