"""Symbolic links planted where pfedla writes, and what a folder holds, to check no write leaves it."""

import os
import shutil
from pathlib import Path


def snapshot(folder: Path) -> dict[str, str | bytes]:
    """Everything under ``folder``: a file's bytes, a link's target, ``dir`` for a folder."""
    found: dict[str, str | bytes] = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        found[name] = (f"-> {os.readlink(path)}" if path.is_symlink() else "dir" if path.is_dir()
                       else path.read_bytes())
    return found


def plant_file_link(out: Path, outside: Path, name: str, index: int) -> None:
    """Move ``name`` out (a reader following the link still finds valid content) and link to it,
    or, where the name is not there yet, link to a file that does not exist (a write through the
    link would create it); and plant a link at its old temporary name ``<name>.partial`` too."""
    outside.mkdir(exist_ok=True)
    victim, partial_victim = outside / f"victim-{index}", outside / f"victim-{index}.partial"
    if (out / name).exists():
        shutil.move(out / name, victim)
    partial_victim.write_bytes(b"victim of the partial name")
    (out / name).symlink_to(victim)
    (out / f"{name}.partial").symlink_to(partial_victim)
