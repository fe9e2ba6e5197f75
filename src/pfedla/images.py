"""The container image that runs every pipeline step, named from one place.

Repository: ``STEP_IMAGE_REPOSITORY`` below. Tag: the project version (from the installed
package metadata, or from ``pyproject.toml`` when running from a source tree), with ``-cuda``
appended for the CUDA variant. ``images/build.sh --print`` reads the same two sources.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

STEP_IMAGE_REPOSITORY = "ghcr.io/pfedla/pfedla-step"
VARIANTS = ("cpu", "cuda")

_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def pyproject_version(path: Path = _PYPROJECT) -> str:
    """The ``version`` key of the ``[project]`` table of a pyproject.toml (no TOML parser needed)."""
    in_project = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("["):
            in_project = line.strip() == "[project]"
        elif in_project and (match := re.match(r'\s*version\s*=\s*"([^"]+)"', line)):
            return match.group(1)
    raise ValueError(f"{path}: no version in the [project] table")


def project_version() -> str:
    try:
        return metadata.version("pfedla")
    except metadata.PackageNotFoundError:
        return pyproject_version()


def step_image(variant: str = "cpu") -> str:
    """Full reference of the step image, e.g. ``ghcr.io/pfedla/pfedla-step:0.1.0-cuda``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown image variant {variant!r}: expected one of {VARIANTS}")
    suffix = "" if variant == "cpu" else f"-{variant}"
    return f"{STEP_IMAGE_REPOSITORY}:{project_version()}{suffix}"
