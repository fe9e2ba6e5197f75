# One entry point for a fresh machine: `make run` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?=
QUICK ?=

.PHONY: setup lock run test test-fast test-images lint bench image engine-stop kind-up kind-down clean

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

# Tests marked `containers` run only in test-images (tests/conftest.py leaves them out otherwise).
test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

# The step image and the pipeline in containers, from nothing: the engine's Debian packages (root,
# apt), the project's engine (started here, stopped after), a Debian base, the image, then every
# test marked `containers`. Those tests fail rather than skip when the engine or the image is missing,
# and pytest's exit status 5 (nothing selected) fails this target like any other.
test-images: $(STAMP)
	images/engine.sh install
	images/engine.sh run -- sh -ec 'images/build.sh; $(PY) -m pytest -q -m containers'

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests components pipelines benchmarks images

bench: $(STAMP)
	$(PY) benchmarks/run.py $(if $(QUICK),--quick)

# With a running docker or podman, the image as images/Dockerfile describes it; without, the project's
# engine builds it from a Debian base with the locked torch (see images/build.sh).
image:
	images/build.sh

# Stops the project's engine if a test or build left it running (by the PID in its pidfile).
engine-stop:
	images/engine.sh stop

kind-up:
	k8s/kind/up.sh

kind-down:
	k8s/kind/down.sh

clean:
	rm -rf runs build dist .pytest_cache .ruff_cache
