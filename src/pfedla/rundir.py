"""The output directory of a simulation run: its identity, its lock, and what a run may touch.

``run.json`` records the config and the run's identity (the config's experiment key plus a
random nonce). Checkpoints and MLflow runs carry the identity, so a resume continues only its
own state. Every check here happens before anything in the directory is written or deleted.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pfedla import storage
from pfedla.config import ExperimentConfig, config_from_dict, experiment_key
from pfedla.errors import ArtifactError, ConfigError, PfedlaError

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
PARTITION_FILE = "partition.json"
LOCK_FILE = ".pfedla.lock"
DATA_CACHE = "data-cache"  # in a seed's folder: where an s3:// data_dir is downloaded to
_IDENTITY = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{8}$")


def new_identity(config: ExperimentConfig) -> str:
    """``<experiment key>-<nonce>``: equal configs share the key, never the identity."""
    return f"{experiment_key(config)}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class RunRecord:
    """What ``run.json`` holds: the run's identity and its config."""

    identity: str
    config: ExperimentConfig

    def to_dict(self) -> dict:
        return {"identity": self.identity, "config": self.config.to_dict()}


def read_record(output_dir: Path) -> RunRecord:
    """``output_dir``'s run.json, checked; damage is an ArtifactError naming the file.

    Without a valid record pfedla cannot tell which files in the directory are that run's, so
    the advice is to remove run.json by hand (--overwrite needs the record to know what it replaces).
    """
    path = output_dir / RUN_FILE
    advice = f" (to start over in {output_dir}, delete {path}; its other files are then left as they are)"
    try:
        recorded = storage.read_json(path)
    except ArtifactError as error:
        raise ArtifactError(f"{error}{advice}") from None
    if not isinstance(recorded, dict):
        raise ArtifactError(f"{path} is damaged: not a JSON object{advice}")
    identity, config = recorded.get("identity"), recorded.get("config")
    if not isinstance(identity, str) or not _IDENTITY.match(identity):
        raise ArtifactError(f"{path} is damaged or from an older pfedla: no valid 'identity'{advice}")
    if not isinstance(config, dict):
        raise ArtifactError(f"{path} is damaged: 'config' is not an object{advice}")
    try:
        return RunRecord(identity, config_from_dict(config))
    except ConfigError as error:
        raise ArtifactError(f"{path} holds an invalid config: {error}{advice}") from None


def resumed_config(output_dir: Path, record: RunRecord) -> ExperimentConfig:
    """The recorded config, rooted where the directory is now (it may have been copied or moved).

    A relative ``checkpoint_dir`` was recorded resolved, so it does not depend on the working
    directory either; the default (inside ``output_dir``) follows the directory.
    """
    return config_from_dict({**record.config.to_dict(), "output_dir": str(output_dir)})


def check_writable(output_dir: Path, key: str = "output_dir") -> None:
    """Refuse an output location (named ``key`` in errors) that cannot hold a run, without creating
    anything."""
    resolved = output_dir.resolve()
    if resolved == Path(resolved.anchor):
        raise PfedlaError(f"{key} {output_dir} is the filesystem root: choose a directory of its own")
    if resolved.exists() and not resolved.is_dir():
        raise PfedlaError(f"{key} {output_dir} exists and is not a directory")
    existing = next(p for p in (resolved, *resolved.parents) if p.exists())
    if not existing.is_dir():
        raise PfedlaError(f"{key} {output_dir} cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PfedlaError(f"{key} {output_dir} is not writable ({existing} refuses writes)")


def create(output_dir: Path) -> None:
    """Make ``output_dir`` (and its parents), as a one-line error when the filesystem refuses."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PfedlaError(f"cannot create output_dir {output_dir}: {error.strerror or error}") from None


def check_state(output_dir: Path, resume: bool, overwrite: bool) -> RunRecord | None:
    """The run already in ``output_dir`` (None: none), after checking the requested mode fits it."""
    if not (output_dir / RUN_FILE).is_file():
        if resume:
            raise PfedlaError(f"cannot resume: {output_dir / RUN_FILE} does not exist "
                              f"(was {output_dir} written by pfedla run?)")
        return None
    record = read_record(output_dir)
    finished = (output_dir / SUMMARY_FILE).is_file()
    if resume or overwrite:
        return record
    if finished:
        raise PfedlaError(f"{output_dir} holds a finished run: choose another output_dir, or replace it "
                          "with --overwrite")
    raise PfedlaError(f"{output_dir} holds an unfinished run: continue it with `pfedla run --resume "
                      f"{output_dir}`, or start over there with --overwrite (deletes its checkpoints)")


def check_pipeline_state(output_dir: Path, overwrite: bool) -> None:
    """What ``pfedla pipeline run-local`` may do in ``output_dir``: never replace a ``pfedla run``
    (its run.json names files run-local does not know), and replace an earlier run-local's
    summary only with ``overwrite``."""
    if os.path.lexists(output_dir / RUN_FILE):
        raise PfedlaError(f"{output_dir} holds a run of `pfedla run` ({RUN_FILE}), which `pfedla pipeline "
                          "run-local` never replaces: choose another output_dir")
    if os.path.lexists(output_dir / SUMMARY_FILE) and not overwrite:
        raise PfedlaError(f"{output_dir} holds a finished run: choose another output_dir, or replace it "
                          "with --overwrite")


def seed_dir(output_dir: Path, seed: int) -> Path:
    """Where one seed's outputs go: ``output_dir/seed_<seed>/``, for one seed as for several."""
    return output_dir / f"seed_{seed}"


def layer_weights_file(algorithm: str, raw: bool = False) -> str:
    """Where in a seed's folder a pFedLA variant's final α goes: ``layer_weights.npy`` for pfedla,
    ``layer_weights_<algorithm>.npy`` otherwise; ``raw`` names HeurpFedLA's unmasked α beside it."""
    stem = "layer_weights_raw" if raw else "layer_weights"
    return f"{stem}.npy" if algorithm == "pfedla" else f"{stem}_{algorithm}.npy"


def seed_files(algorithms: list[str], seeds: list[int]) -> list[str]:
    """The files (relative to ``output_dir``) a run writes for each of ``seeds`` and ``algorithms``."""
    files = []
    for seed in seeds:
        folder = f"seed_{seed}"
        files.append(f"{folder}/{PARTITION_FILE}")
        for name in algorithms:
            files += [f"{folder}/results/{name}.json", f"{folder}/models/{name}.safetensors",
                      f"{folder}/checkpoints/{name}.safetensors", f"{folder}/{layer_weights_file(name)}",
                      f"{folder}/{layer_weights_file(name, raw=True)}"]
    return files


def written_folders(identity: str | None, algorithms: list[str], seeds: list[int]) -> list[str]:
    """Folders (relative to ``output_dir``) a run writes in besides those of its files: each seed's
    data cache and the default checkpoint locations, down to each (seed, algorithm) folder of the
    run ``identity`` when there is one."""
    roots = ["checkpoints/rounds", "checkpoints/fallback"]
    caches = [f"seed_{seed}/{DATA_CACHE}" for seed in seeds]
    if identity is None:
        return roots + caches
    return caches + [f"{root}/{identity}/seed_{seed}/{name}"
                     for root in roots for seed in seeds for name in algorithms]


def remove_outputs(output_dir: Path, files: list[str]) -> None:
    """Delete ``summary.json`` and ``files`` (relative to ``output_dir``): a replaced run's own files,
    never through a symbolic link on the way (``storage.delete``)."""
    for name in [SUMMARY_FILE, *files]:
        storage.delete(output_dir / name, root=output_dir)


# Files in output_dir that MLflow's local store writes itself (sqlite and its journals, artifacts):
# pfedla cannot make those writes refuse links, so a link there stops a run before it starts.
TRACKING_NAMES = ("mlflow.db", "mlflow.db-journal", "mlflow.db-wal", "mlflow.db-shm", "mlartifacts")


def check_no_links(output_dir: Path, files: list[str], folders: list[str]) -> None:
    """Refuse ``output_dir`` when a folder a run writes in (``folders`` and those of ``files``, relative
    to it, and each of their parents), one of the tracking store's files, or anything below
    ``mlartifacts`` is a symbolic link:
    it could lead the run's writes or deletions outside ``output_dir``. A link at a file pfedla
    writes itself is harmless (the write replaces it, ``storage.write_local``) and is not refused."""
    for folder in sorted({*folders, *(str(Path(name).parent) for name in files)} - {"."}):
        if (link := storage.first_link(output_dir, folder)) is not None:
            raise PfedlaError(f"{link} is a symbolic link, and pfedla never writes through one (it could "
                              f"lead outside {output_dir}): remove it, or choose another output_dir")
    artifacts = output_dir / "mlartifacts"
    links = [output_dir / name for name in TRACKING_NAMES if (output_dir / name).is_symlink()]
    if not links and artifacts.is_dir():  # MLflow writes below it, following any link it meets
        links = [Path(top, name) for top, below, names in os.walk(artifacts) for name in (*below, *names)
                 if Path(top, name).is_symlink()]
    if links:
        raise PfedlaError(f"{links[0]} is a symbolic link, and MLflow or pfedla would write through it "
                          f"(it could lead outside {output_dir}): remove it, or choose another output_dir")


class RunLock:
    """An exclusive lock on ``output_dir`` for as long as a run writes there.

    ``flock`` is released by the kernel when the process dies, so a killed run never leaves a
    stale lock behind. It guards one machine's writers (and NFS only where flock works there).
    """

    def __init__(self, output_dir: Path):
        self.path = output_dir / LOCK_FILE
        self._file: IO[str] | None = None

    def __enter__(self) -> RunLock:
        handle = self._open()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(200).strip() or "unknown"
            handle.close()
            raise PfedlaError(f"{self.path.parent} is in use by another pfedla run ({holder}): wait for it "
                              "to finish or stop it first") from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._file = handle
        return self

    def _open(self) -> IO[str]:
        """The lock file, opened without following a link, and only when it is a plain file of its own
        (the lock writes the holder's pid into it: a link or a hard link would carry that elsewhere)."""
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as error:
            if self.path.is_symlink():
                raise PfedlaError(f"{self.path} is a symbolic link, and pfedla never writes through one: "
                                  "remove it") from None
            raise PfedlaError(f"cannot write in {self.path.parent}: {error.strerror or error}") from None
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode) or status.st_nlink != 1:
            os.close(descriptor)
            raise PfedlaError(f"{self.path} is not a plain file of its own (a hard link or a special file), "
                              "and pfedla writes into it: remove it")
        return os.fdopen(descriptor, "r+")

    def __exit__(self, *_: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
