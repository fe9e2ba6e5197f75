"""What every test folder shares: the real-server fixtures, the tiny-config builder, and the rule that a
test's folder says what it is.

- ``unit/``: one module at a time, no servers, no kfp.local runs: ``make test-fast`` runs these (and
  ``platform/``).
- ``integration/``: real ``mlflow server`` and SeaweedFS processes, kfp.local pipelines, killed and
  resumed runs. Every test here is marked ``integration`` by its folder.
- ``platform/``: what runs on a cluster rather than in Python: Kubernetes manifests, the installer,
  the step image, shell scripts, the dependency locks. A test here that needs a real server carries
  the ``integration`` mark itself.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pfedla.config import ExperimentConfig, config_from_dict

pytest_plugins = ["servers", "kfp_api"]

TESTS = Path(__file__).resolve().parent
# The tiny experiment: digits (the default, offline), CPU, a few clients and rounds. Seconds to run.
TINY = {"clients": 4, "rounds": 3, "device": "cpu"}


def merged(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``layer`` on top; a section given in both is merged key by key."""
    out = dict(base)
    for key, value in layer.items():
        both_sections = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both_sections else value
    return out


@pytest.fixture
def tiny_config(tmp_path: Path) -> Callable[..., ExperimentConfig]:
    """Build a validated config of the tiny experiment writing under ``tmp_path`` (outputs in ``out``,
    the pipeline's data plane in ``plane``), with layers of overrides on top, e.g.
    ``tiny_config(STEPS, pfedla={"heur_k": 0}, rounds=2)``."""
    def build(*layers: dict[str, Any], **overrides: Any) -> ExperimentConfig:
        raw = {**TINY, "output_dir": str(tmp_path / "out"),
               "pipeline": {"data_root": str(tmp_path / "plane")}}
        for layer in (*layers, overrides):
            raw = merged(raw, layer)
        return config_from_dict(raw)

    return build


@pytest.fixture
def restore_print():
    """kfp.local patches ``print`` while it runs a ParallelFor and leaves it patched: put it back."""
    original = builtins.print
    yield
    builtins.print = original


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under integration/ as ``integration``; a unit test with that mark is misfiled."""
    misfiled = []
    for item in items:
        folder = Path(str(item.fspath)).relative_to(TESTS).parts[0]
        if folder == "integration":
            item.add_marker(pytest.mark.integration)
        elif folder == "unit" and item.get_closest_marker("integration"):
            misfiled.append(item.nodeid)
    if misfiled:
        raise pytest.UsageError(f"integration tests belong in tests/integration/: {', '.join(misfiled)}")
