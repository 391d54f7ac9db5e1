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

.PHONY: setup demo test ui chromium clean lock

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev,scale]'
	touch $@

demo: setup
	$(BIN)/multitag run

test: setup chromium
	$(BIN)/python -m pytest

# The browser test drives Debian's chromium (headless); install it when missing.
chromium:
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  APT="$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get"; \
	  $$APT install -y -q chromium || { $$APT update -q && $$APT install -y -q chromium; }; }

# The Prefect server with its UI on http://127.0.0.1:4200 (for `multitag deploy` / `multitag worker`).
ui: setup
	$(BIN)/multitag server

# Start this workspace over: outputs, raw data, scratch, the local store, DVC's run cache (else the next
# run would restore the register stage's report of a registration the deleted store no longer holds),
# and lineage.yaml back to its defaults (the inbox and its archive are left alone: they hold what
# people dropped there).
# infra/requirements.lock, the image's hashed dependency set, after a change to pyproject.toml
lock: setup
	$(BIN)/python infra/lock.py

clean:
	rm -rf data models reports store .multitag predictions.csv .dvc/cache/runs
	$(BIN)/python -c "from multitag.lineage import reset_lineage; reset_lineage('.')"
