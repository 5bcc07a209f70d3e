#!/usr/bin/env bash
# LoRA on a Phi-2-sized model (2.7 B, random init, nothing downloaded) with lorafleet's
# training path and with the seed recipe: tokens/s, MFU and peak GPU memory; a short table last.
#
#   bench/gpu_check.sh              # a CUDA machine; finishes in under 8 minutes
#   bench/gpu_check.sh --dry-run    # anywhere: the same code path on the CPU, tiny model
#   bench/gpu_check.sh --help       # options (steps, batch, LoRA rank, QLoRA, ...)
#
# Needs the worker extra in $PYTHON (default .venv/bin/python, else python3):
# pip install -e '.[worker]' (and '.[worker,gpu]' for --quantization 4bit).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# No hub, no telemetry: everything this needs is built here.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
# Leave time for the table: the whole check stays under 8 minutes.
exec timeout --signal=INT --kill-after=20 460 "$PY" -m bench.gpu_check "$@"
