"""benchmarks/gpu.sh's CPU smoke run: every stage at tiny sizes, with Ray, MLflow and boto3 made
unimportable (the GPU box has none of them), the reference step replaced by a stand-in that prints
what the real one prints (the real one lives outside the repository, and is slow at full width)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

BLOCK = """import sys
for name in ("ray", "mlflow", "boto3"):
    sys.modules[name] = None  # any import of them fails, in every process started from here
"""

STAND_IN_REF = """import argparse, json
p = argparse.ArgumentParser()
for flag in ("--batch", "--size", "--steps", "--warmup"):
    p.add_argument(flag, type=int)
p.add_argument("--device")
p.add_argument("--amp", action="store_true")
p.add_argument("--channels-last", action="store_true")
a = p.parse_args()
print(json.dumps({"mode": "train", "batch": a.batch, "step_ms": 100.0 * a.batch, "peak_mem_gb": None}))
"""


@pytest.mark.integration  # about a minute on the shared 2-core box: several processes, real images
def test_gpu_script_runs_every_stage_on_cpu_without_ray_mlflow_boto3(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCK)
    (tmp_path / "ref.py").write_text(STAND_IN_REF)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", "REF_STEP": str(tmp_path / "ref.py")}
    blocked = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "ModuleNotFoundError" in blocked.stderr  # the block holds
    argv = ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--device", "cpu", "--size", "32", "--width", "4",
            "--batches", "2", "--steps", "1", "--warmup", "1", "--repeats", "3", "--loop-images", "8",
            "--loop-steps", "2", "--log-every", "2", "--translate-batches", "2", "--translate-images", "4",
            "--io-workers", "2", "--no-compile"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    by_figure = {}
    for row in rows:
        by_figure.setdefault(row["figure"], []).append(row)
    assert by_figure["sync_check"][0]["skipped"] == "cuda only"
    measured = [r for r in rows if r["figure"] not in ("summary", "sync_check")]
    assert not [r for r in measured if "skipped" in r]
    steps = [(r["batch"], r["bf16_channels_last"]) for r in by_figure["step"]]
    assert steps == [(1, False), (2, True)]
    summary = by_figure["summary"][0]
    best = summary["best_batch"]
    assert [(r["batch"], r["bf16_channels_last"]) for r in by_figure["ref"]] == [(1, False), (best, True)]
    assert [r["batch"] for r in by_figure["loop"]] == sorted({1, best})
    for r in measured:
        rate = r.get("images_per_s") or r["ours_images_per_s"]
        assert len(rate["runs"]) == 3 and rate["min"] <= rate["median"] <= rate["max"] and rate["min"] > 0
        assert r["rss_gb"] > 0 and r["rss_peak_gb"] >= r["rss_gb"] and "gpu_peak_gb" in r
    for r in by_figure["ref"]:  # the stand-in does 10 images/s whatever the batch
        assert r["ref_images_per_s"]["median"] == 10.0
        assert r["ours_vs_ref"]["median"] > 0 and r["ref_rss_peak_gb"] > 0
    for key in ("step_fp32_batch1", "step_bf16_best", "ours_vs_ref_bf16_best", "loop_batch1", "loop_best",
                "translate_best", "encode_png", "encode_jpeg"):
        assert summary[key] > 0, key
    assert "ours/ref" in proc.stdout and "figure" in proc.stdout  # the table
