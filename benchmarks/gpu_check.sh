#!/usr/bin/env bash
# GPU check (issue 27): fp16 and bf16 AMP runs of every technique fragment (no NaN, loss within tolerance of
# fp32), CUDA peak memory of activation checkpointing and of optimizer offload, and MFU of the main job.
# One CUDA GPU, <= 8 minutes (stopped at 480 s; what was measured by then is kept).
# Run it from anywhere when a GPU is at hand; the figures and the card go in the README's performance table:
#     bash benchmarks/gpu_check.sh                        # writes runs/gpu_check/gpu_check.json and .md
#     bash benchmarks/gpu_check.sh --out /tmp/gpu_check   # any option of python -m benchmarks.gpu_check --help
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi > /dev/null; then
    echo "gpu_check.sh: nvidia-smi not found: this check needs a CUDA GPU" >&2
    exit 1
fi
echo "card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)"
timeout 480 python -m benchmarks.gpu_check "$@"
