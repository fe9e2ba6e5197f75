"""Per-round checkpoints of the simulation: atomic, kept to the last K, resumable.

Layout under the checkpoint location (a local directory or an ``s3://`` prefix)::

    <run>/<algorithm>/round_00012.safetensors   server state after 12 rounds, metadata in the header
    <run>/<algorithm>/LATEST                    name of the newest complete checkpoint

``<run>`` is the run's identity (``run.json``) and seed, ``<identity>/seed_<s>``, also in every
checkpoint's metadata: runs (and seeds) that share a checkpoint location never read, prune or
clear each other's checkpoints; a store of ``<identity>`` alone clears all its seeds.

Locally a file is written to a new ``*.partial`` file and renamed, so a crash never leaves a torn
checkpoint under its final name, and never through a symbolic link below the checkpoint location
(``storage.write_local``); on S3 a PUT is atomic and the pointer is updated after it.
Loading walks from the newest checkpoint down and skips (with a warning) any that is
damaged, another run's, or holds a tensor no run may continue from (NaN, Inf, absurdly large),
so a corrupt newest checkpoint falls back to the previous good one.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pfedla import storage
from pfedla.algorithms.base import value_problem
from pfedla.errors import ArtifactError

log = logging.getLogger(__name__)
ROUND_FILE = re.compile(r"^round_(\d{5})\.safetensors$")


@dataclass
class Checkpoint:
    """A restored server state and where the run stood when it was written."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    location: str

    @property
    def rounds_done(self) -> int:
        return int(self.meta["rounds_done"])


class CheckpointStore:
    """Writes and finds checkpoints of one experiment, per algorithm."""

    def __init__(self, location: str | Path, keep: int, run: str, fallback: Path | None = None):
        self.location = str(location).rstrip("/")
        self.keep = keep
        self.run = run
        self.fallback = fallback  # local directory used when the object store is down

    def _folder(self, root: str, algorithm: str) -> str:
        return f"{root}/{self.run}/{algorithm}"

    def save(self, algorithm: str, rounds_done: int, tensors: dict[str, torch.Tensor],
             meta: dict[str, Any]) -> str:
        """Write the checkpoint after ``rounds_done`` rounds, then the pointer, then prune."""
        folder = self._folder(self.location, algorithm)
        name = f"round_{rounds_done:05d}.safetensors"
        full_meta = {**meta, "algorithm": algorithm, "rounds_done": rounds_done, "run": self.run}
        try:
            # locally, only inside the checkpoint location: never through a link on the way
            storage.save_tensors(f"{folder}/{name}", tensors, full_meta, root=self.location)
            storage.write_bytes(f"{folder}/LATEST", name.encode(), root=self.location)
            self._prune(folder)
        except storage.StorageError as error:
            saved = ""
            if self.fallback is not None and storage.is_s3(self.location):
                local = self._folder(str(self.fallback), algorithm)
                storage.save_tensors(f"{local}/{name}", tensors, full_meta, root=self.fallback)
                storage.write_bytes(f"{local}/LATEST", name.encode(), root=self.fallback)
                saved = f"; this round's checkpoint was saved locally in {local}"
            raise storage.StorageError(
                f"checkpoint after round {rounds_done} could not be stored: {error}{saved}. "
                "Resume with `pfedla run --resume <output_dir>` once it can be written again"
            ) from None
        return f"{folder}/{name}"

    def _prune(self, folder: str) -> None:
        names = sorted(self._round_files(folder))
        for old in names[: max(0, len(names) - self.keep)]:
            storage.delete(f"{folder}/{old}", root=self.location)

    @property
    def _roots(self) -> list[str]:
        """The main location, then the local fallback if there is one."""
        return [self.location] + ([str(self.fallback)] if self.fallback is not None else [])

    def clear(self) -> None:
        """Delete every checkpoint of this run (all algorithms), and nothing else."""
        for root in self._roots:
            storage.delete_prefix(f"{root}/{self.run}")

    @staticmethod
    def _round_files(folder: str) -> list[str]:
        return [name for name in storage.list_names(folder) if ROUND_FILE.match(name)]

    def latest(self, algorithm: str) -> Checkpoint | None:
        """The newest readable checkpoint of ``algorithm`` (main location and local fallback)."""
        candidates: list[tuple[str, str]] = []
        for root in self._roots:
            folder = self._folder(root, algorithm)
            candidates += [(name, f"{folder}/{name}") for name in self._round_files(folder)]
        candidates.sort(reverse=True)
        for _, location in candidates:
            try:
                tensors, meta = storage.load_tensors(location)
            except (ArtifactError, storage.StorageError) as error:
                log.warning("checkpoint %s is unusable (%s); falling back to the previous one",
                            location, error)
                continue
            if problem := _foreign(meta, algorithm, self.run):
                log.warning("checkpoint %s is not this run's (%s); falling back to the previous one",
                            location, problem)
                continue
            if problem := _unusable_tensor(tensors):
                log.warning("checkpoint %s is unusable (%s); falling back to the previous one",
                            location, problem)
                continue
            return Checkpoint(tensors, meta, location)
        return None



def _unusable_tensor(tensors: dict[str, torch.Tensor]) -> str | None:
    """The first tensor whose values a run must not continue from (NaN, Inf, absurd), or None."""
    for name, tensor in tensors.items():
        if problem := value_problem(tensor):
            return f"tensor '{name}' {problem}"
    return None


def _foreign(meta: dict[str, Any], algorithm: str, run: str) -> str | None:
    """Why a checkpoint's metadata does not belong to ``run``'s ``algorithm``, or None."""
    if meta.get("run") != run:
        return f"written by run {str(meta.get('run'))[:80]}"
    if meta.get("algorithm") != algorithm:
        return f"holds algorithm {str(meta.get('algorithm'))[:80]}"
    rounds_done, history = meta.get("rounds_done"), meta.get("history")
    if type(rounds_done) is not int or rounds_done < 1:
        return "no valid rounds_done"
    if not isinstance(history, list) or len(history) != rounds_done or not all(
            isinstance(entry, dict) for entry in history):
        return "its history does not match rounds_done"
    if not isinstance(meta.get("seconds"), (int, float)):
        return "no valid seconds"
    if not isinstance(meta.get("mlflow_run_id"), (str, type(None))):
        return "no valid mlflow_run_id"
    return None
