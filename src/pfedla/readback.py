"""What a resume or a report reads back from an output directory, checked against the run's own
record (``run.json``) before it is used.

Anyone who can write in an output directory can edit, truncate or plant its files. Every value
read back from one passes through here: only the run's own algorithms and seeds, numbers of the
right type, finite and in range (accuracies in [0, 1]), lists and arrays shaped for the run's
clients, classes and model. Anything else is one ArtifactError naming the file and the key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pfedla import registry
from pfedla.config import ExperimentConfig, num_classes_of, run_seeds
from pfedla.errors import ArtifactError, shown

UNIT = (0.0, 1.0)
NON_NEGATIVE = (0.0, math.inf)
# Per-round metrics the report draws, with their ranges; other metrics need only be numbers (a
# diverged run's loss may be NaN: that is for the run to report, not for reading back to refuse).
HISTORY_RANGES = {
    "accuracy_mean": UNIT, "accuracy_client_mean": UNIT, "accuracy_min": UNIT, "accuracy_max": UNIT,
    "alpha_self_weight": UNIT, "alpha_entropy": NON_NEGATIVE, "bytes_down": NON_NEGATIVE,
    "bytes_up": NON_NEGATIVE,
}
ALPHA_SLACK = 1e-6  # α's normalised weights may exceed 1 by rounding


def _damaged(where: str | Path, key: str, problem: str) -> ArtifactError:
    return ArtifactError(f"{where} is damaged or from an older pfedla: '{key}' {problem}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number(value: Any, where: str | Path, key: str, bounds: tuple[float, float] = (-math.inf, math.inf)
           ) -> float:
    """``value`` as a float when it is a finite number within ``bounds`` (inclusive)."""
    low, high = bounds
    # a JSON integer may have thousands of digits: compare it as an int, never convert it first
    finite = isinstance(value, int) or (_is_number(value) and math.isfinite(value))
    if not (_is_number(value) and finite and low <= value <= high):
        raise _damaged(where, key, f"must be a finite number in [{low}, {high}], got {shown(value)}")
    return float(value)


def _mapping(value: Any, where: str | Path, key: str) -> dict:
    if not isinstance(value, dict):
        raise _damaged(where, key, f"must be a JSON object, got {shown(value)}")
    return value


def _list(value: Any, where: str | Path, key: str, length: int, each: str) -> list:
    if not isinstance(value, list) or len(value) != length:
        size = f"{len(value)} entries" if isinstance(value, list) else shown(value)
        raise _damaged(where, key, f"must list one entry per {each} of the run ({length}), got {size}")
    return value


def _rounds(value: Any, where: str | Path, key: str, config: ExperimentConfig) -> int:
    if type(value) is not int or value != config.rounds:
        raise _damaged(where, key, f"must be the run's {config.rounds} rounds, got {shown(value)}")
    return value


def check_seed_result(entry: Any, where: str | Path, key: str, config: ExperimentConfig) -> dict:
    """One (algorithm, seed) result, as ``AlgorithmResult.summary`` wrote it: accuracies in [0, 1],
    one per client of the run, the run's rounds, a finite wall time, an MLflow run id or null."""
    entry = _mapping(entry, where, key)
    for name in ("mean_accuracy", "client_mean_accuracy", "min_accuracy", "max_accuracy"):
        number(entry.get(name), where, f"{key}{name}", UNIT)
    accuracies = _list(entry.get("client_accuracies"), where, f"{key}client_accuracies", config.clients,
                       "client")
    for index, value in enumerate(accuracies):
        number(value, where, f"{key}client_accuracies[{index}]", UNIT)
    _rounds(entry.get("rounds"), where, f"{key}rounds", config)
    number(entry.get("wall_seconds"), where, f"{key}wall_seconds", NON_NEGATIVE)
    run_id = entry.get("mlflow_run_id")
    if not isinstance(run_id, (str, type(None))):
        raise _damaged(where, f"{key}mlflow_run_id", f"must be a string or null, got {shown(run_id)}")
    return entry


def check_history(history: Any, where: str | Path, config: ExperimentConfig) -> list[dict[str, float]]:
    """A run's per-round metrics: one object per round of the run, every value a number, those the
    report draws (``HISTORY_RANGES``) finite and in range."""
    if not isinstance(history, list) or len(history) != config.rounds:
        raise _damaged(where, "history", f"must list the run's {config.rounds} rounds, got {shown(history)}")
    for index, metrics in enumerate(history):
        metrics = _mapping(metrics, where, f"history[{index}]")
        for name, value in metrics.items():
            key = f"history[{index}].{name}"
            if name in HISTORY_RANGES:
                number(value, where, key, HISTORY_RANGES[name])
            elif not _is_number(value):
                raise _damaged(where, key, f"must be a number, got {shown(value)}")
    return history


def check_result(saved: Any, where: str | Path, config: ExperimentConfig) -> dict:
    """``results/<algorithm>.json`` of a finished (algorithm, seed): its result and its history."""
    check_seed_result(saved, where, "", config)
    check_history(saved.get("history"), where, config)
    return saved


def check_summary(summary: Any, where: str | Path, config: ExperimentConfig) -> dict:
    """``summary.json``: exactly the run's algorithms, each with numbers in range and exactly the
    run's seeds (named as ``pfedla run`` names them: ``"0"``, never another spelling of 0)."""
    summary = _mapping(summary, where, "<root>")
    for name in summary:
        if name not in config.algorithms:
            raise ArtifactError(f"{where} is damaged: it lists algorithm {shown(name)}, which this run "
                                f"(run.json: {', '.join(config.algorithms)}) did not run")
    if missing := [name for name in config.algorithms if name not in summary]:
        raise ArtifactError(f"{where} is damaged: it lacks the run's algorithm {missing[0]}")
    seeds = [str(seed) for seed in run_seeds(config)]
    for name, entry in summary.items():
        entry = _mapping(entry, where, name)
        for key in ("mean_accuracy", "client_mean_accuracy", "min_accuracy", "max_accuracy"):
            number(entry.get(key), where, f"{name}.{key}", UNIT)
        for key in ("mean_accuracy_std", "client_mean_accuracy_std"):
            if len(seeds) == 1 and entry.get(key) is not None:
                raise _damaged(where, f"{name}.{key}", f"must be null for one seed, got {shown(entry[key])}")
            if len(seeds) > 1:
                number(entry.get(key), where, f"{name}.{key}", UNIT)
        _rounds(entry.get("rounds"), where, f"{name}.rounds", config)
        number(entry.get("wall_seconds"), where, f"{name}.wall_seconds", NON_NEGATIVE)
        by_seed = _mapping(entry.get("seeds"), where, f"{name}.seeds")
        if sorted(by_seed) != sorted(seeds):
            raise _damaged(where, f"{name}.seeds", f"must name exactly the run's seeds {', '.join(seeds)}, "
                                                   f"got {len(by_seed)}: {shown(list(by_seed))}")
        for seed in seeds:
            check_seed_result(by_seed[seed], where, f"{name}.seeds.{seed}.", config)
    return summary


def check_partition(saved: Any, where: str | Path, config: ExperimentConfig) -> np.ndarray:
    """``partition.json``: per client of the run, the train samples of each class (whole numbers
    >= 0), as ``[clients, classes]``."""
    clients = _list(_mapping(saved, where, "<root>").get("clients"), where, "clients", config.clients,
                    "client")
    classes = num_classes_of(config)
    for index, client in enumerate(clients):
        counts = _list(_mapping(client, where, f"clients[{index}]").get("train"), where,
                       f"clients[{index}].train", classes, "class")
        if not all(type(count) is int and count >= 0 for count in counts):
            raise _damaged(where, f"clients[{index}].train",
                           f"must hold whole numbers >= 0, got {shown(counts)}")
    return np.array([client["train"] for client in clients], dtype=float)


def check_alpha(alpha: np.ndarray, where: str | Path, config: ExperimentConfig) -> np.ndarray:
    """A pFedLA variant's final α: floats of shape [clients, the model's layers, clients] in [0, 1]."""
    shape = (config.clients, registry.MODELS[config.model].layers, config.clients)
    if alpha.shape != shape:
        raise ArtifactError(f"{where} holds shape {alpha.shape}, not the run's [clients, layers, clients] "
                            f"{shape}")
    if not np.issubdtype(alpha.dtype, np.floating):
        raise ArtifactError(f"{where} holds {alpha.dtype} values, not floating-point weights")
    if not (np.isfinite(alpha).all() and alpha.min() >= 0.0 and alpha.max() <= 1.0 + ALPHA_SLACK):
        raise ArtifactError(f"{where} holds weights outside [0, 1] or not finite")
    return alpha


def load_alpha(path: Path, config: ExperimentConfig) -> np.ndarray:
    """A saved α (``.npy``, never unpickled), checked by ``check_alpha``."""
    try:
        alpha = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{path} is damaged: {shown(error)}") from None
    return check_alpha(alpha, path, config)
