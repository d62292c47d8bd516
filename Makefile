# Two commands on a fresh machine: `make demo` and `make test`. Both install into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Everything: the core and every extra (pyproject.toml pins torch/torchvision). `make lock` rewrites pylock.toml,
# the resolved versions and hashes of this install; `pip install -r pylock.toml` then `pip install --no-deps -e .`
# reproduces it.
EXTRAS := all,test
export DS_ACCELERATOR ?= cpu
export DS_BUILD_OPS ?= 0
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install lock demo test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $@

# The lock is the resolved install: pip lock resolves under the versions .venv holds (no fresh search). The
# project's own entry (a directory, which pip cannot hash) is dropped: install it with --no-deps after the lock.
PROJECT_ENTRY := [[packages]]\nname = "gpfm-scale"\n\n[packages.directory]\npath = "."\n\n
lock: install
	$(BIN)/pip freeze --exclude-editable > $(VENV)/installed.txt
	$(BIN)/pip lock -q -c $(VENV)/installed.txt -o pylock.toml '.[$(EXTRAS)]'
	$(BIN)/python -c 'import pathlib, sys; p = pathlib.Path("pylock.toml"); t = p.read_text(); \
	e = sys.argv[1].encode().decode("unicode_escape"); assert e in t, "no project entry"; p.write_text(t.replace(e, ""))' \
	'$(PROJECT_ENTRY)'

demo: install
	$(BIN)/gpfm-scale demo --out demo-output

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/bench_tiling.py

clean:
	rm -rf demo-output .pytest_cache
