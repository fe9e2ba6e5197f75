# One entry point for a fresh machine: `make run` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?=
QUICK ?=

.PHONY: setup run test test-fast lint bench image kind-up kind-down clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

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
