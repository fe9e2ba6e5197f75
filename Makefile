# One entry point for a fresh machine: `make run` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?=
QUICK ?=

.PHONY: setup lock run test test-fast lint bench image kind-up kind-down clean

setup: $(STAMP)

# The locks pin every package, with hashes, for CPython 3.11 on Linux x86-64 (where CI and the
# images run); elsewhere setup falls back to the ranges in pyproject.toml and says so.
LOCK := requirements/dev.lock
LOCKED_PLATFORM := import sys, platform; sys.exit(not (sys.version_info[:2] == (3, 11) and sys.platform == "linux" and platform.machine() == "x86_64"))
COMPILE := $(PY) -m piptools compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if $(PY) -c '$(LOCKED_PLATFORM)'; then \
	  $(PY) -m pip install --quiet --require-hashes -r $(LOCK) && \
	  $(PY) -m pip install --quiet --no-deps --no-build-isolation -e . ; \
	else \
	  echo "note: $(LOCK) is for CPython 3.11 on Linux x86-64; installing from pyproject.toml's ranges"; \
	  $(PY) -m pip install --quiet -e ".[dev]"; \
	fi
	touch $(STAMP)

# Refresh both locks after changing dependencies in pyproject.toml (needs the index; run on
# CPython 3.11, Linux x86-64). Commit the result.
lock: $(STAMP)
	$(COMPILE) --extra dev --output-file requirements/dev.lock pyproject.toml
	$(COMPILE) --output-file requirements/runtime.lock pyproject.toml

run: $(STAMP)
	$(VENV)/bin/pfedla run $(if $(CONFIG),--config $(CONFIG))

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests components pipelines benchmarks

bench: $(STAMP)
	$(PY) benchmarks/run.py $(if $(QUICK),--quick)

image:
	images/build.sh

kind-up:
	k8s/kind/up.sh

kind-down:
	k8s/kind/down.sh

clean:
	rm -rf runs build dist .pytest_cache .ruff_cache
