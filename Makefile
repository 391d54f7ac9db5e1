# Two commands for a newcomer: `make demo` (the pipeline on the built-in sample data) and
# `make test` (the whole test suite). Both create the virtual environment first if it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(abspath $(VENV))/bin

# No analytics from Prefect or DVC; the venv's scripts (multitag, dvc) first on PATH.
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# Prefect's temporary API server migrates a fresh database on first start; allow it time.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export PATH := $(BIN):$(PATH)

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/multitag run

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf data models reports store predictions.csv
