"""Which requirements an image build installs, from requirements/runtime.lock and pyproject.toml.

Run in the image's builder stage: ``python3 split_lock.py LOCK PYPROJECT OUT_DIR [TORCH_INDEX_URL]``
writes ``OUT_DIR/torch.txt`` and ``OUT_DIR/locked.txt``.

- Without a torch index (an empty TORCH_INDEX_URL), torch comes from the lock like everything else:
  PyPI's torch==2.14.1, a CUDA build that brings its nvidia-* wheels and runs on CPU too.
  ``torch.txt`` is empty and ``locked.txt`` is the whole lock.
- With a torch index (the CPU image's default is the PyTorch CPU index), ``torch.txt`` holds the
  torch and torchvision pins pyproject.toml declares (``2.14.1+cpu`` satisfies ``==2.14.1``), and
  ``locked.txt`` is the lock without torch, torchvision and their CUDA-only dependencies.

Standard library only (it runs before anything is installed), Python 3.11+ (tomllib).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

TORCH_PINS = re.compile(r"(torch|torchvision)\s*==")
# A lock entry that exists only for PyPI's CUDA build of torch.
CUDA_BUILD = re.compile(r"(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==")


def lock_entries(lock_text: str) -> list[str]:
    """The lock's text cut before each pin (the header comment is the first piece)."""
    return re.split(r"\n(?=[A-Za-z0-9])", lock_text)


def torch_pins(pyproject_text: str) -> list[str]:
    dependencies = tomllib.loads(pyproject_text)["project"]["dependencies"]
    pins = [d for d in dependencies if TORCH_PINS.match(d)]
    if not any(pin.startswith("torch") and not pin.startswith("torchvision") for pin in pins):
        raise ValueError("pyproject.toml pins no torch==VERSION")
    return pins


def split(lock_text: str, pyproject_text: str, torch_index: str) -> tuple[str, str]:
    """(torch.txt, locked.txt) for a build that takes torch from ``torch_index`` ('' = from the lock)."""
    if not torch_index:
        return "", lock_text
    kept = [entry for entry in lock_entries(lock_text) if not CUDA_BUILD.match(entry)]
    return "\n".join(torch_pins(pyproject_text)) + "\n", "\n".join(kept)


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print("usage: split_lock.py LOCK PYPROJECT OUT_DIR [TORCH_INDEX_URL]", file=sys.stderr)
        return 2
    lock, pyproject, out = Path(argv[0]), Path(argv[1]), Path(argv[2])
    torch_index = argv[3] if len(argv) == 4 else ""
    torch_text, locked_text = split(lock.read_text(), pyproject.read_text(), torch_index)
    (out / "torch.txt").write_text(torch_text)
    (out / "locked.txt").write_text(locked_text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
