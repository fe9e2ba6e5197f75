"""The locks (requirements/*.lock, written by `make lock`): every dependency pyproject.toml names is
pinned there at a version its range allows, every pin carries hashes, and the two locks agree."""

import re
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:\s*\\\n\s+--hash=sha256:[0-9a-f]{64})+)",
                   re.MULTILINE)


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_text(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (version, hashes) for every pin of a hashed requirements file."""
    pins = {}
    for name, version, hashes in ENTRY.findall(text):
        pins[normalized(name)] = (version, frozenset(re.findall(r"sha256:([0-9a-f]{64})", hashes)))
    pinned_lines = re.findall(r"^[A-Za-z0-9][^\s#]*==", text, re.MULTILINE)
    assert len(pins) == len(pinned_lines), "a pin without hashes"
    return pins


def locked(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    return locked_text(path.read_text())


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
