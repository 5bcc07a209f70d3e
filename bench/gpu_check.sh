#!/usr/bin/env bash
# LoRA through lorafleet's training path and through the seed recipe, on Phi-2's configuration
# (bf16 and QLoRA) and a Llama-3-8B-shaped one, random init, nothing downloaded: real tokens/s,
# executed FLOPs per token and MFU, peak GPU memory; a table last (bench/gpu_check.py says
# what counts).
#
#   bench/gpu_check.sh              # a CUDA machine; all of it within 8 minutes
#   bench/gpu_check.sh --dry-run    # anywhere: the same code path on the CPU, tiny models
#   bench/gpu_check.sh --help       # options (cases, steps, batch, LoRA rank, ...)
#
# Needs the worker and gpu extras in $PYTHON (default .venv/bin/python, else python3). A
# machine without a package index gets what it lacks as wheels: scripts/fetch_gpu_wheels.sh,
# run where there is an index, puts them in .whl/; those this Python lacks (at that version)
# are installed here into $GPU_CHECK_SITE, with no index and no dependency resolution, and put
# ahead on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
WHEELS="${GPU_CHECK_WHEELS:-.whl}"
SITE="${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/lorafleet-gpu-site}"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    mapfile -t missing < <("$PY" - "$WHEELS"/*.whl <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

for path in sys.argv[1:]:
    name, wanted = path.rsplit("/", 1)[-1].split("-")[:2]  # {name}-{version}-...whl
    try:
        if version(name) == wanted:
            continue
    except PackageNotFoundError:
        pass
    print(path)
EOF
)
    if [ "${#missing[@]}" -gt 0 ]; then
        "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
            --disable-pip-version-check --upgrade --target "$SITE" "${missing[@]}"
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        echo "gpu_check: installed ${#missing[@]} wheels from $WHEELS into $SITE"
    fi
fi
# No hub, no telemetry: everything this needs is built here.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
# The whole check, the install above included, stays under 8 minutes: at the limit the check
# is interrupted and still prints the table of the cases it finished.
exec timeout --signal=INT --kill-after=20 $((460 - SECONDS)) "$PY" -m bench.gpu_check "$@"
