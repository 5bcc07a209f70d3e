# Entry points for people and CI. `make demo` and `make test` create .venv on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Written after a successful install; reinstalls only when pyproject.toml changes.
STAMP := $(VENV)/.lorafleet-installed
# torch is installed first and pinned: with no torch present, the worker extra's range would
# resolve to a multi-GB CUDA build, while this exact version is found as a local CPU wheel.
TORCH_PIN := torch==2.13.0

.PHONY: venv demo test lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e ".[worker,dev]"
	touch $@

demo: venv
	$(BIN)/lorafleet demo

test: venv
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
