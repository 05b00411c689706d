"""Quality regression on real digits, bounded by steps (not time): CoGAN's pairs and CycleGAN's
MNIST-M → MNIST translations lift their metric clearly above its floor within a fixed number of
steps. A flipped loss sign, a broken sharing rule or a schedule that stops learning leaves the
metric at its floor (chance for pair agreement, the untranslated input for label preservation).

The judges here are trained for 2 epochs (about 0.95 on real digits) to keep the test short; the
thresholds sit far below what these steps reach and far above the floors (measured on the 2-core
machine: see each test).
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from pipeline.evaluation import EvalOptions, Evaluator
from pipeline.loop import run_plain
from pipeline.run_config import (
    CheckpointSettings,
    DataSettings,
    EvalSettings,
    StorageSettings,
    TrainSettings,
    make_config,
    resolve_paths,
)

QUICK_JUDGES = {"epochs": 2}


def quick_run(tmp_path, model: str, data: DataSettings, steps: int, batch_size: int, **model_settings):
    """A run of the plain loop: no MLflow, one checkpoint at the end, evaluated only where a test says."""
    cfg = make_config(model, recipe=f"quality-{model}", data=data,
                      train=TrainSettings(steps=steps, batch_size=batch_size, log_every=100),
                      eval=EvalSettings(every=0), checkpoint=CheckpointSettings(every=0, keep=1),
                      storage=StorageSettings(path=str(tmp_path / "runs")), home=str(tmp_path / "home"))
    return resolve_paths(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model_settings)))


def only_on(split: str, **settings):
    """An evaluator factory for the loop that evaluates `split` alone, with the quick judges."""
    def make(cfg, spec, model_cfg, device, wanted):
        if wanted != split:
            return None
        options = EvalOptions(cfg.data.path, classifier=QUICK_JUDGES, **settings)
        return Evaluator(spec, model_cfg, options, split)

    return make


@pytest.mark.integration
def test_cogan_pairs_agree_well_above_chance_on_real_digits(real_ingests, tmp_path):
    dst, _ = real_ingests["digits"]
    data = DataSettings(path=dst, load_size=28, flip=False, reader="local")  # 28 px, MNIST (a), USPS (b)
    cfg = quick_run(tmp_path, "cogan", data, steps=600, batch_size=32, ngf=32, ndf=32)
    final = run_plain(cfg, make_evaluator=only_on("val", size=28, pairs=256))
    agreement = final["eval/pair_agreement"]
    print("pair agreement", agreement)
    assert final["step"] == 600 and agreement >= 0.35, agreement  # chance 0.10


@pytest.mark.integration
def test_cyclegan_keeps_mnist_m_digits_well_above_the_untranslated_floor(real_ingests, tmp_path):
    dst, _ = real_ingests["mnist2mnistm"]
    data = DataSettings(path=dst, load_size=32, flip=False, reader="local")
    cfg = quick_run(tmp_path, "cyclegan", data, steps=400, batch_size=4, channels_a=1, channels_b=3,
                    lambda_identity=0.0, ngf=16, ndf=16, n_blocks=2)
    final = run_plain(cfg, make_evaluator=only_on("test", size=32, max_images=300, label_domain=""))
    floor, kept = final["baseline/label_acc_ba"], final["test/label_acc_ba"]
    print("label_acc_ba", kept, "floor", floor)
    assert final["step"] == 400 and kept >= floor + 0.25, (kept, floor)


# `python -m MODULE ARGS` on a machine with torch but neither Ray, MLflow, boto3 nor an install of
# the project: those imports fail, and the editable install's finder is taken off the import path.
BLOCKED = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "mlflow", "boto3", "botocore"):
            raise ImportError("blocked " + name)
sys.meta_path[:] = [Block()] + [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.mark.integration
def test_quality_benchmark_runs_the_plain_loop_without_ray_mlflow_or_boto3(tmp_path):
    """The GPU machine has torch but not Ray, MLflow or boto3: `--no-ray` must not need them."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the checkout only, as `-m` finds it
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED, "benchmarks.quality", "--recipe", "cyclegan_facades-quick",
         "--no-ray", "--home", str(tmp_path), "--set", "train.steps=4", "eval.every=0", "checkpoint.every=0"],
        capture_output=True, text=True, timeout=600, cwd=repo, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[0])
    scores = {s["metric"]: s for s in result["scores"]}
    assert result["steps"] == 4 and scores["test/pixel_acc_ab"]["value"] is not None
    assert scores["test/pixel_acc_ab"]["floor"] is not None  # the most frequent class, from the test split
