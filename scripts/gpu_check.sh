#!/usr/bin/env bash
# Run the default continual job and the overhead benchmark on one CUDA device.
#
# Usage: bash scripts/gpu_check.sh [OUTPUT_DIR]     (default outputs/gpu_check)
#
# Meant to finish in under 5 minutes on one data-center GPU: the default job is
# 4 tasks x 30 steps of all-MiniLM-L6-v2, and the benchmark runs the tiny BERT
# and MiniLM with its default sizes and no depth/width sweep. Each part has its
# own time limit, so a slow device fails with a timeout instead of running on.
# It needs a CUDA build of torch in .venv (scripts/setup.sh installs the CPU
# build) and the Debian fortunes package for the default job.
#
# NOTE: written on a machine without a GPU, so this script has not been run
# yet, and the 5-minute target is an estimate, not a measurement.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
OUTPUT_DIR=${1:-outputs/gpu_check}

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    torch_version=$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo "not installed")
    echo "gpu_check.sh needs a CUDA device, but torch.cuda.is_available() is False (torch $torch_version)." >&2
    echo "Run it on a machine with an NVIDIA GPU and a CUDA build of torch (pip install 'torch==2.13.*')." >&2
    exit 1
fi

export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUTPUT_DIR"
started=$(date +%s)
"$PYTHON" -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'

echo "== default continual job (configs/default.yaml), one process"
timeout 110 .venv/bin/accelerate launch --num_processes 1 scripts/continual_finetune.py \
    run.output_dir="$OUTPUT_DIR/default_job"
test -f "$OUTPUT_DIR/default_job/results.json"

echo "== overhead benchmark"
timeout 180 "$PYTHON" scripts/benchmark_overhead.py --models tiny-bert,minilm --sweep-layers '' \
    --output "$OUTPUT_DIR/benchmark.json"

echo "gpu_check.sh finished in $(( $(date +%s) - started )) s; results in $OUTPUT_DIR"
