#!/usr/bin/env bash
# Fetch the wheels that bench/gpu_check.sh needs on a GPU machine without a package index.
#
#   scripts/fetch_gpu_wheels.sh                 # into .whl/ (ignored by git), for Python 3.12
#   PYTHON_VERSION=3.11 scripts/fetch_gpu_wheels.sh
#   scripts/fetch_gpu_wheels.sh rich==15.0.0    # and more names, for a machine that lacks them
#
# Run it where pip reaches an index, then bring .whl/ along with the checkout; gpu_check.sh
# installs whatever lies there (no index, no dependency resolution) before it starts.
#
# The GPU machine is taken to be a CUDA PyTorch image with ON_THE_MACHINE below (any version
# that works with them). What lorafleet's training path imports beyond that is PACKAGES, with
# what each is for; each is fetched at the version constraints/gpu.txt pins, else at the
# version installed in .venv (the one the tests ran with). --no-deps: these are all there is to
# it (tests/bench/test_gpu_check.py checks both lists against what the check imports).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-.venv/bin/python}"
DEST="${WHEELS_DIR:-.whl}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
ON_THE_MACHINE=(
    torch transformers peft accelerate tokenizers safetensors huggingface-hub
    numpy pandas pyarrow fsspec filelock packaging pyyaml tqdm psutil httpx rich
    prometheus-client
)
PACKAGES=(
    pydantic pydantic-core typing-inspection annotated-types typing-extensions  # shared/
    pydantic-settings python-dotenv  # shared.settings
    sqlalchemy  # shared.models
    standardwebhooks  # shared.outbox
    boto3 botocore s3transfer jmespath python-dateutil six urllib3  # shared.storage: S3
    datasets dill multiprocess xxhash  # worker.preprocess
    bitsandbytes  # quantization: "4bit" (QLoRA)
)

if [ ! -x "$PY" ]; then
    echo "fetch_gpu_wheels: $PY not found: run 'make venv' first (or set PYTHON)" >&2
    exit 2
fi
# name==version for each package: the pin, else the installed version.
mapfile -t WANTED < <("$PY" - "${PACKAGES[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pins = {}
for line in open("constraints/gpu.txt", encoding="utf-8"):
    line = line.split("#", 1)[0].strip()
    if line:
        req = Requirement(line)
        pins[canonicalize_name(req.name)] = str(req.specifier).removeprefix("==")
for name in sys.argv[1:]:
    key = canonicalize_name(name)
    try:
        print(f"{name}=={pins.get(key) or version(name)}")
    except PackageNotFoundError:
        sys.exit(f"fetch_gpu_wheels: {name} is neither pinned in constraints/gpu.txt nor "
                 "installed in the virtual environment")
EOF
)
[ "${#WANTED[@]}" -eq "${#PACKAGES[@]}" ] || exit 1  # the lookup said why
WANTED+=("$@")

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two of one package stop the install there
# A manylinux tag is matched exactly: name the ones these packages publish.
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
    --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    "${WANTED[@]}"

count=$(find "$DEST" -maxdepth 1 -name '*.whl' | wc -l)
bytes=$(find "$DEST" -maxdepth 1 -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
echo "fetch_gpu_wheels: $count wheels, $((bytes / 1048576)) MiB in $DEST/ (Python $PYTHON_VERSION)"
echo "fetch_gpu_wheels: taken to be on the GPU machine already: ${ON_THE_MACHINE[*]}"
