"""The locks (requirements/*.lock, written by `make lock`): every dependency pyproject.toml names is
pinned there at a version its range allows, every pin carries hashes, and the two locks agree."""

from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from lock_files import locked, locked_text, normalized

ROOT = Path(__file__).resolve().parents[2]
def declared(group: str | None = None) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] + (project["optional-dependencies"][group] if group else [])
    return [Requirement(spec) for spec in names]


def test_each_lock_pins_every_declared_dependency_within_its_range():
    for lock, requirements in (("runtime.lock", declared()), ("dev.lock", declared("dev"))):
        pins = locked(ROOT / "requirements" / lock)
        for requirement in requirements:
            name = normalized(requirement.name)
            assert name in pins, f"{lock} lacks {requirement.name}: run `make lock`"
            version, hashes = pins[name]
            assert requirement.specifier.contains(version, prereleases=True), f"{lock}: {name}=={version}"
            assert hashes, name


def test_torch_is_locked_at_the_project_pins_and_the_locks_agree():
    runtime, dev = locked(ROOT / "requirements" / "runtime.lock"), locked(ROOT / "requirements" / "dev.lock")
    assert runtime["torch"][0] == "2.14.1" and runtime["torchvision"][0] == "0.29.1"
    assert {name: entry for name, entry in dev.items() if name in runtime} == runtime
    assert "pytest" in dev and "pytest" not in runtime


def test_the_parser_refuses_a_pin_without_hashes():
    with pytest.raises(AssertionError, match="without hashes"):
        locked_text("six==1.16.0\n")
