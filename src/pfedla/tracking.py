"""MLflow tracking: params once, per-round metrics in batches, α arrays and heatmaps, models.

The default store is a sqlite file inside the run's output directory; ``MLFLOW_TRACKING_URI``
wins when set (e.g. a remote ``mlflow server`` whose artifacts are proxied to S3).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pfedla.errors import PfedlaError, without_credentials
from pfedla.figures import alpha_heatmap_figure, png_bytes

METRIC_FLUSH_ROUNDS = 10  # one log_batch call per this many rounds (and at the end)
SENTINEL_METRIC = "clients"  # logged every round by both orchestrations: tells how far a run got
FINAL_METRIC = "final_accuracy_mean"  # logged once, at step `rounds`, when a run's outputs are final
FINAL_CLIENT_MEAN_METRIC = "final_accuracy_client_mean"  # beside it: the unweighted mean over clients


def default_tracking_uri(output_dir: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a sqlite file in ``output_dir``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir).resolve()}/mlflow.db"


def artifact_root(tracking_uri: str, output_dir: str | Path) -> Path | None:
    """Where a run's artifacts go: ``output_dir/mlartifacts`` beside a local store (MLflow's own
    default is ``./mlruns`` of the working directory, outside the run), None for a tracking server,
    which stores artifacts itself (e.g. proxied to S3)."""
    served = tracking_uri.startswith(("http://", "https://", "databricks"))
    return None if served else Path(output_dir) / "mlartifacts"


def relocate_local_store(tracking_uri: str, artifact_root: Path) -> None:
    """Point a local sqlite store's artifact locations at ``artifact_root`` after its output
    directory was copied or moved: MLflow keeps absolute ``file://`` URIs, which would still name
    the old place, so a resumed run would write its artifacts into another directory."""
    import sqlite3

    database = Path(tracking_uri.removeprefix("sqlite:///"))
    if not tracking_uri.startswith("sqlite:///") or not database.is_file():
        return
    new_root = artifact_root.resolve().as_uri()
    with contextlib.closing(sqlite3.connect(database)) as connection, connection:
        # experiments were created with the artifact root itself as their location
        roots = {location for (location,) in connection.execute("SELECT artifact_location FROM experiments")
                 if location and location.startswith("file://") and location.endswith("/mlartifacts")}
        for old_root in roots - {new_root}:
            for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
                connection.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # noqa: S608 - fixed names
                    f"WHERE substr({column}, 1, ?) = ?",
                    (new_root, len(old_root) + 1, len(old_root), old_root))
        relocated = bool(roots - {new_root})
        runs = [run_id for (run_id,) in connection.execute("SELECT run_uuid FROM runs")] if relocated else []
    _forget_artifact_locations(runs)


def _forget_artifact_locations(run_ids: list[str]) -> None:
    """Drop MLflow's in-process memory of where these runs' artifacts go (it keeps one per run id for
    the life of the process): after a relocation it would still name the old directory."""
    from mlflow.tracking._tracking_service import utils

    cache = getattr(utils, "_artifact_repos_cache", {})  # MLflow 2.x/3.x: an OrderedDict by run id
    for run_id in run_ids:
        cache.pop(run_id, None)


class TrackingError(PfedlaError):
    """The MLflow tracking store could not be reached or refused a call."""


def _guarded_call(where: str, action: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``, its failures as one ``TrackingError`` naming the store ``where``."""
    import requests
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return call(*args, **kwargs)
    except MlflowException as error:
        if error.error_code == "RESOURCE_ALREADY_EXISTS":  # an answer callers handle
            raise
        detail = without_credentials(str(error))
    except (requests.RequestException, SQLAlchemyError, OSError) as error:
        # a database store on a full or read-only disk fails in SQLAlchemy, not in MLflow
        detail = without_credentials((str(error) or repr(error)).splitlines()[0])
    raise TrackingError(f"MLflow at {where} failed to {action}: {detail[:1000]}") from None


def _tag_filter(tags: dict[str, str]) -> str:
    """An MLflow search filter matching runs that carry every one of ``tags``."""
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in sorted(tags.items()))


# How long the first request to a tracking server may take. MLflow's own client retries a refused
# connection 7 times with a doubling backoff (minutes, a urllib3 warning line each), so a server
# that does not answer is found by one direct request before any work starts.
PROBE_SECONDS = 10.0


def check_reachable(tracking_uri: str, timeout: float = PROBE_SECONDS) -> None:
    """Raise ``TrackingError`` unless the tracking server at ``tracking_uri`` answers within ``timeout``
    seconds; a local store (sqlite, file) needs no probe. Any HTTP answer will do: authentication and
    everything else is MLflow's to check on its first call."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import requests

    where = without_credentials(tracking_uri)
    try:
        requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=timeout, allow_redirects=False)
    except requests.RequestException as error:
        reason = without_credentials((str(error) or repr(error)).splitlines()[0])
        raise TrackingError(f"MLflow at {where} failed to answer: {reason[:500]}") from None


class _GuardedClient:
    """An ``MlflowClient`` whose failures become one ``TrackingError`` naming the store without
    credentials: MLflow's own messages quote the full tracking URI, password included."""

    def __init__(self, tracking_uri: str):
        from mlflow.tracking import MlflowClient

        self._where = without_credentials(tracking_uri)
        # a database store is created (its tables migrated) right here
        self._client = _guarded_call(self._where, "open the store", MlflowClient, tracking_uri=tracking_uri)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not callable(method):
            return method
        return functools.partial(_guarded_call, self._where, name.replace("_", " "), method)


class Tracker:
    """One MLflow run at a time; metrics are buffered and sent with ``log_batch``."""

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_root: Path | None = None):
        import mlflow

        self.tracking_uri = tracking_uri
        check_reachable(tracking_uri)
        if without_credentials(tracking_uri) != tracking_uri:
            # MLflow prints each finished run's link to stdout, password included
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self.client = _GuardedClient(tracking_uri)
        self._metric_type = mlflow.entities.Metric
        self._param_type = mlflow.entities.Param
        self._tag_type = mlflow.entities.RunTag
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            location = artifact_root.resolve().as_uri() if artifact_root else None
            self.experiment_id = self.client.create_experiment(experiment_name, artifact_location=location)
        else:
            self.experiment_id = experiment.experiment_id
        self.run_id: str | None = None
        self._pending: list = []
        self._stored_through = -1  # steps at or below this are already in a resumed run

    def start_run(self, name: str, params: dict[str, str], tags: dict[str, str]) -> str:
        self.run_id = self._create_run(name, params, tags)
        return self.run_id

    def _create_run(self, name: str, params: dict[str, str], tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.client.log_batch(
            run.info.run_id, params=[self._param_type(k, v[:6000]) for k, v in sorted(params.items())]
        )
        return run.info.run_id

    def open_parent(self, name: str, params: dict[str, str], tags: dict[str, str], resume: bool) -> str:
        """The run grouping an experiment's runs (each names it in its ``mlflow.parentRunId`` tag).

        A resume continues the newest run carrying ``tags`` when there is one. The parent stays
        RUNNING, beside the current run, until ``close_parent``.
        """
        existing = self.find_run(tags) if resume else None
        if existing is None:
            return self._create_run(name, params, tags)
        self.client.update_run(existing, status="RUNNING")
        return existing

    def close_parent(self, run_id: str, metrics: dict[str, float],
                     files: Sequence[tuple[Path, str | None]]) -> None:
        """Log ``metrics`` (those it lacks: a resumed parent may hold them) and ``files`` as
        ``(path, artifact folder)`` to the parent run ``run_id``, then end it FINISHED."""
        held = self.client.get_run(run_id).data.metrics
        stamp = int(time.time() * 1000)
        missing = [self._metric_type(k, float(v), stamp, 0) for k, v in sorted(metrics.items())
                   if k not in held]
        for start in range(0, len(missing), 1000):  # MLflow caps one batch at 1000 metrics
            self.client.log_batch(run_id, metrics=missing[start : start + 1000])
        for path, folder in files:
            self.client.log_artifact(run_id, str(path), folder)
        self.client.set_terminated(run_id, status="FINISHED")

    def find_run(self, tags: dict[str, str]) -> str | None:
        """The newest run of this experiment carrying all ``tags``, if any."""
        runs = self.client.search_runs([self.experiment_id], _tag_filter(tags), max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self._run(), tags=[self._tag_type(k, v) for k, v in sorted(tags.items())])

    def resume_run(self, run_id: str) -> int:
        """Continue an existing run; returns the last round it already holds (-1 for none).

        Rounds up to that one are not sent again, so a resumed run has no duplicate steps.
        """
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        stored = [m.step for name in (SENTINEL_METRIC, FINAL_METRIC)
                  for m in self.client.get_metric_history(run_id, name)]
        self._stored_through = max(stored, default=-1)
        return self._stored_through

    def close_running(self, tags: dict[str, str], keep: str | None) -> list[str]:
        """End as KILLED every RUNNING run of this experiment carrying ``tags``, except ``keep``."""
        query = f"{_tag_filter(tags)} and attributes.status = 'RUNNING'"
        closed = []
        for run in self.client.search_runs([self.experiment_id], query, max_results=1000):
            if run.info.run_id != keep:
                self.client.set_terminated(run.info.run_id, status="KILLED")
                closed.append(run.info.run_id)
        return closed

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Queue one round's metrics; they are sent every few rounds in one batch."""
        if step <= self._stored_through:
            return
        stamp = int(time.time() * 1000)
        self._pending.extend(self._metric_type(k, float(v), stamp, step) for k, v in metrics.items())
        if len({m.step for m in self._pending}) >= METRIC_FLUSH_ROUNDS:
            self.flush()

    def flush(self) -> None:
        # MLflow caps one batch at 1000 metrics.
        for start in range(0, len(self._pending), 1000):
            self.client.log_batch(self._run(), metrics=self._pending[start : start + 1000])
        self._pending = []

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self._run(), str(path), artifact_path)

    def log_dir(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self._run(), str(path), artifact_path)

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        """Store ``data`` as the run's artifact ``artifact_file`` (``folder/name``)."""
        folder, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / name).write_bytes(data)
            self.log_file(Path(tmp) / name, folder or None)

    def log_json(self, payload: object, artifact_file: str) -> None:
        self.log_bytes(json.dumps(payload, indent=2, sort_keys=True).encode(), artifact_file)

    def log_layer_weights(self, alpha: np.ndarray, layer_names: Sequence[str], label: str,
                          raw: np.ndarray | None = None) -> None:
        """α [N, L, N] as an .npy plus one heatmap per layer, under layer_weights/<label>/; HeurpFedLA's
        α before its one-hot rows, when given, as ``layer_weights_raw.npy`` beside it."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            np.save(folder / "layer_weights.npy", alpha)
            if raw is not None:
                np.save(folder / "layer_weights_raw.npy", raw)
            clients = range(alpha.shape[0])
            for index, name in enumerate(layer_names):
                figure = alpha_heatmap_figure(alpha[:, [index], :], clients, [name], f"α ({label})")
                (folder / f"layer{index:02d}_{name}.png").write_bytes(png_bytes(figure, dpi=80))
            self.log_dir(folder, f"layer_weights/{label}")

    def register_models(self, name: str, artifact_path: str) -> str:
        """Register the run's ``artifact_path`` as a version of model ``name``, once per run; returns it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        existing = self.client.search_model_versions(f"name='{name}' and run_id='{self._run()}'")
        if existing:  # a resubmitted final segment: the version is already there
            return existing[0].version
        run = self.client.get_run(self._run())
        source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
        return self.client.create_model_version(name, source, run_id=self._run()).version

    def end_run(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self._run(), status=status)
        self.run_id = None
        self._stored_through = -1

    def _run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("no MLflow run is active")
        return self.run_id


def parent_metrics(summary: dict) -> dict[str, float]:
    """The parent run's metrics: each algorithm's two final mean accuracies over seeds
    (``<algorithm>/final_accuracy_mean``...), and their standard deviations when there are several."""
    metrics = {}
    for name, entry in summary.items():
        for metric, key in ((FINAL_METRIC, "mean_accuracy"),
                            (FINAL_CLIENT_MEAN_METRIC, "client_mean_accuracy")):
            metrics[f"{name}/{metric}"] = entry[key]
            if entry[f"{key}_std"] is not None:
                metrics[f"{name}/{metric}_std"] = entry[f"{key}_std"]
    return metrics
