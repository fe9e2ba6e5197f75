"""Reading the hashed requirement locks (requirements/*.lock, written by `make lock`)."""

import re
from pathlib import Path

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
