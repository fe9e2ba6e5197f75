"""The pipeline's data plane: bulk tensors as checked objects under one experiment prefix.

On a cluster, KFP's launcher downloads every input artifact of a step whole before the step
starts. So bulk data never travels inside KFP artifacts: shards, start models, updates and
server states are objects under ``<pipeline.data_root>/runs/<experiment>/<key>/``, and the
artifacts are small JSON *manifests* holding :class:`ObjectRef` s (URI, size, sha256). A step
fetches exactly the objects it needs, and a reader refuses an object whose bytes do not match
its reference. Keys name the round and client, and a key is never reused for other content,
so KFP caching and resubmission stay correct::

    data/client_<i>.train.safetensors  data/client_<i>.test.safetensors  data/partition.json
    rounds/<r>/state.safetensors  rounds/<r>/history.json     server state before round r
    rounds/<r>/models/client_<i>.safetensors                  θ̄_i, client i's start model
    rounds/<r>/updates/client_<i>.safetensors                 Δ_i, client i's update
    evaluations/round_<r>/...                                 a run's final evaluation
    checkpoints/round_<r>/{state.safetensors, history.json, manifest.json}, checkpoints/LATEST

Every :class:`DataPlane` counts the bytes it reads and writes (objects and manifests), so each
step reports what it moved.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pfedla import storage
from pfedla.config import ExperimentConfig, experiment_key
from pfedla.errors import ArtifactError, ConfigError

MANIFEST_VERSION = 1


def data_root(config: ExperimentConfig, cluster: bool = False) -> str:
    """``pipeline.data_root``, checked for where the pipeline runs: it must be set, and on a cluster
    (``cluster``) be an ``s3://`` prefix, since a pod cannot see this machine's directories."""
    root = config.pipeline.data_root
    if not root:
        raise ConfigError("pipeline.data_root", "is not set: the pipeline keeps its tensors in an object "
                                                "store prefix (a directory for run-local), e.g. "
                                                "--set pipeline.data_root=s3://pfedla")
    if cluster and not storage.is_s3(root):
        raise ConfigError("pipeline.data_root", f"must be an s3:// prefix for a cluster run (pods cannot see "
                                                f"{root}), e.g. --set pipeline.data_root=s3://pfedla")
    return root


def run_prefix(config: ExperimentConfig, data_root: str) -> str:
    """The experiment's prefix under ``data_root``: one per experiment name and config key."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", config.experiment_name).strip("-.") or "experiment"
    return f"{data_root.rstrip('/')}/runs/{name}/{experiment_key(config)}"


def round_folder(round_idx: int) -> str:
    return f"rounds/{round_idx:05d}"


def client_folder(client: int, round_idx: int) -> str:
    """Where a client keeps the state it left round ``round_idx`` with (its own storage)."""
    return f"clients/client_{client}/round_{round_idx:05d}"


def checkpoint_folder(round_idx: int) -> str:
    return f"checkpoints/round_{round_idx:05d}"


@dataclass(frozen=True)
class ObjectRef:
    """Where an object is and what it must contain."""

    uri: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> ObjectRef:
        try:
            uri, size, digest = raw["uri"], raw["size"], raw["sha256"]
        except (KeyError, TypeError):
            raise ArtifactError(f"{where}: not an object reference (uri, size, sha256): {raw!r:.200}"
                                ) from None
        if not (isinstance(uri, str) and type(size) is int and size >= 0 and isinstance(digest, str)
                and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise ArtifactError(f"{where}: malformed object reference {raw!r:.200}")
        return cls(uri, size, digest)


@dataclass
class Transfers:
    """What one step moved: bytes and the objects behind them."""

    read_bytes: int = 0
    written_bytes: int = 0
    copied_bytes: int = 0  # copied by the store itself: no bytes through the step
    objects_read: list[str] = field(default_factory=list)
    objects_written: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"read_bytes": self.read_bytes, "written_bytes": self.written_bytes,
                "copied_bytes": self.copied_bytes, "objects_read": list(self.objects_read),
                "objects_written": list(self.objects_written)}


def strict_json(payload: Any) -> bytes:
    """JSON that every consumer parses: NaN and Infinity are refused, not written as bare tokens."""
    return json.dumps(payload, indent=1, sort_keys=True, allow_nan=False).encode()


class DataPlane:
    """One experiment's objects under ``prefix``, with the I/O ledger of the current step."""

    def __init__(self, prefix: str):
        self.prefix = prefix.rstrip("/")
        self.transfers = Transfers()

    def uri(self, key: str) -> str:
        return f"{self.prefix}/{key}"

    def put_bytes(self, key: str, data: bytes) -> ObjectRef:
        uri = self.uri(key)
        storage.write_bytes(uri, data)
        self.transfers.written_bytes += len(data)
        self.transfers.objects_written.append(key)
        return ObjectRef(uri, len(data), hashlib.sha256(data).hexdigest())

    def get_bytes(self, ref: ObjectRef) -> bytes:
        """The object's bytes, refused unless they are exactly what the reference says."""
        data = storage.read_bytes(ref.uri)
        self.transfers.read_bytes += len(data)
        self.transfers.objects_read.append(self._key(ref.uri))
        if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
            raise ArtifactError(f"{ref.uri} does not match its manifest (expected {ref.size} bytes with "
                                f"sha256 {ref.sha256[:12]}..., found {len(data)} bytes): it was changed or "
                                "damaged after it was written")
        return data

    def put_tensors(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
                    ) -> ObjectRef:
        return self.put_bytes(key, storage.tensor_bytes(tensors, meta))

    def get_tensors(self, ref: ObjectRef) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return storage.tensors_from_bytes(self.get_bytes(ref), ref.uri)

    def put_json(self, key: str, payload: Any) -> ObjectRef:
        return self.put_bytes(key, strict_json(payload))

    def get_json(self, ref: ObjectRef) -> Any:
        return storage.json_from_bytes(self.get_bytes(ref), ref.uri)

    def copy(self, ref: ObjectRef, key: str) -> ObjectRef:
        """Copy an object inside the store (checked by size; its digest carries over)."""
        target = self.uri(key)
        storage.copy(ref.uri, target)
        self.transfers.copied_bytes += ref.size
        self.transfers.objects_written.append(key)
        return ObjectRef(target, ref.size, ref.sha256)

    def delete_folder(self, key: str) -> int:
        return storage.delete_prefix(self.uri(key))

    def folders(self, key: str) -> list[str]:
        return storage.list_folders(self.uri(key))

    def read_manifest(self, path: str | Path, kind: str) -> dict[str, Any]:
        """A manifest the launcher placed at ``path`` (an input artifact), checked for its kind."""
        data = storage.read_bytes(path)
        self.transfers.read_bytes += len(data)
        manifest = storage.json_from_bytes(data, str(path))
        if not isinstance(manifest, dict) or manifest.get("kind") != kind:
            found = manifest.get("kind") if isinstance(manifest, dict) else type(manifest).__name__
            raise ArtifactError(f"{path} is not a {kind} manifest (found {found!r})")
        if manifest.get("version") != MANIFEST_VERSION:
            raise ArtifactError(f"{path}: manifest version {manifest.get('version')!r} is not "
                                f"{MANIFEST_VERSION}; it was written by another pfedla release")
        return manifest

    def write_manifest(self, path: str | Path, kind: str, payload: dict[str, Any], ledger: bool = True
                       ) -> None:
        """Write an output manifest. The one manifest per step with ``ledger`` carries the step's I/O
        ledger (``transfers``), which counts everything but this manifest itself."""
        manifest = {**payload, "kind": kind, "version": MANIFEST_VERSION, "prefix": self.prefix}
        if ledger:
            manifest["transfers"] = self.transfers.to_dict()
        body = strict_json(manifest)
        self.transfers.written_bytes += len(body)
        storage.write_bytes(path, body)

    def _key(self, uri: str) -> str:
        return uri[len(self.prefix) + 1:] if uri.startswith(self.prefix + "/") else uri


def ref_at(manifest: dict[str, Any], *path: str | int) -> ObjectRef:
    """The ObjectRef at ``manifest[path...]``, with an error naming the path when it is missing."""
    node: Any = manifest
    for step in path:
        try:
            node = node[str(step) if isinstance(node, dict) else step]
        except (KeyError, IndexError, TypeError):
            raise ArtifactError(f"manifest has no entry {'/'.join(map(str, path))}") from None
    return ObjectRef.from_dict(node, "/".join(map(str, path)))


def finite_summary(values: dict[str, Any]) -> dict[str, str | bool | int | float]:
    """Values a KFP launcher accepts as artifact metadata: finite numbers, strings and booleans.

    The cluster's launcher rejects ``null`` and bare ``NaN``/``Infinity`` (the pod fails), so
    missing values are left out and non-finite ones are named under ``non_finite``.
    """
    summary: dict[str, str | bool | int | float] = {}
    non_finite = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            non_finite.append(key)
        elif isinstance(value, (str, bool, int, float)):
            summary[key] = value
        else:
            raise TypeError(f"metadata {key!r} must be a number, string or boolean, "
                            f"got {type(value).__name__}")
    if non_finite:
        summary["non_finite"] = ",".join(non_finite)
    return summary
