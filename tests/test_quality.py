"""Quality regression on real digits, bounded by steps (not time): CoGAN's pairs and CycleGAN's
MNIST-M → MNIST translations lift their metric clearly above its floor within a fixed number of
steps. A flipped loss sign, a broken sharing rule or a schedule that stops learning leaves the
metric at its floor (chance for pair agreement, the untranslated input for label preservation).

The judges here are trained for 2 epochs (about 0.95 on real digits) to keep the test short; the
thresholds sit far below what these steps reach and far above the floors (measured on the 2-core
machine: see each test).
"""

import json
import os
import subprocess
import sys

import pytest

from models import MODELS
from pipeline.data import LocalReader
from pipeline.evaluation import Evaluator
from pipeline.loop import train_local

QUICK_JUDGES = {"epochs": 2}


@pytest.mark.integration
def test_cogan_pairs_agree_well_above_chance_on_real_digits(real_ingests):
    dst, _ = real_ingests["digits"]
    spec = MODELS["cogan"]
    cfg = spec.Config(ngf=32, ndf=32)  # 28 px, MNIST (a) and USPS (b)
    reader = LocalReader(dst, "train", load_size=28, batch_size=32, flip=False, seed=0)
    nets, *_ = train_local(spec, cfg, reader, steps=600, seed=0)
    evaluator = Evaluator(spec, cfg, dst, "val", size=28, classifier=QUICK_JUDGES, pairs=256)
    agreement = evaluator.metrics(nets)["eval/pair_agreement"]
    print("pair agreement", agreement)
    assert agreement >= 0.35, agreement  # chance 0.10


@pytest.mark.integration
def test_cyclegan_keeps_mnist_m_digits_well_above_the_untranslated_floor(real_ingests):
    dst, _ = real_ingests["mnist2mnistm"]
    spec = MODELS["cyclegan"]
    cfg = spec.Config(channels_a=1, channels_b=3, lambda_identity=0.0, ngf=16, ndf=16, n_blocks=2)
    reader = LocalReader(dst, "train", load_size=32, batch_size=4, flip=False, seed=0)
    nets, *_ = train_local(spec, cfg, reader, steps=400, seed=0)
    evaluator = Evaluator(spec, cfg, dst, "test", size=32, max_images=300, label_domain="",
                          classifier=QUICK_JUDGES)
    floor = evaluator.baselines()["baseline/label_acc_ba"]
    kept = evaluator.metrics(nets)["eval/label_acc_ba"]
    print("label_acc_ba", kept, "floor", floor)
    assert kept >= floor + 0.25, (kept, floor)


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
