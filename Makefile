# A new user's whole set-up: `make demo` then `make test`. Everything is installed into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

# setup.py compiles the kernels of stacker/_fast.py ahead of time (stacker._aot):
# reinstalled when the files it is compiled from change (stacker.compiled.SOURCES, listed
# here too), or stacker would use numba's kernels instead.
$(STAMP): pyproject.toml setup.py stacker/_fast.py stacker/_registers.py stacker/sorting.py \
		stacker/compiled.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/stacker demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# Benchmarks: simulated 4096x4096 darks (cached in benchmarks/data), ccdproc for comparison.
# (installed once per install of stacker: reinstalling rebuilds its compiled kernels, ~25 s)
$(VENV)/.bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) demo .pytest_cache build stacker/_aot*.so stacker/_aot*.pyd
