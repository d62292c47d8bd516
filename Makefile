# Two commands on a fresh machine: `make demo` and `make test`. Both install into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pins: this CUDA 13 build runs on CPU too, and PyPI torchvision beside any other torch fails
# to import (see REFERENCE.md, field notes).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
export DS_ACCELERATOR ?= cpu
export DS_BUILD_OPS ?= 0
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[test]' $(TORCH_PINS)
	touch $@

demo: install
	$(BIN)/gpfm-scale demo --out demo-output

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/bench_tiling.py

clean:
	rm -rf demo-output .pytest_cache
