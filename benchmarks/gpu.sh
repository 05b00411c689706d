#!/usr/bin/env bash
# Every GPU figure of issue 15 in one run, within about 5 minutes on one H100/H200: train step at
# 256² beside the reference step, the loop without Ray, the batch translation core, torch.compile
# on/off; medians of 3 with their spread, peak memory beside each (see benchmarks/gpu.py).
#   bash benchmarks/gpu.sh                       # defaults: cuda, 256², batches 1..32
#   REF_STEP=path/to/ref_cyclegan_step.py bash benchmarks/gpu.sh --no-compile
# Needs torch, numpy, Pillow, pyarrow, safetensors; never Ray, MLflow or boto3. PYTHON picks the
# interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "${PYTHON:-python3}" -m benchmarks.gpu "$@"
