"""What an experiment produced: each (algorithm, seed) run's result, the summary over seeds that
``summary.json`` holds, its statistics and its table, and the files that record them.

Both orchestrations write their results through here: ``pfedla run`` (one folder per seed) and
``pfedla pipeline run-local`` (the pipeline's one seed).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pfedla import readback, rundir, storage
from pfedla.config import ExperimentConfig
from pfedla.errors import ArtifactError


def client_mean(accuracies: Sequence[float]) -> float:
    """The unweighted mean of per-client accuracies: every client counts once, whatever its test
    size (what pFL papers report as the average personalized accuracy)."""
    return sum(accuracies) / len(accuracies)


@dataclass
class LayerWeights:
    """pFedLA's α [N, L, N] as aggregated with, and HeurpFedLA's α before its one-hot rows (None
    without HeurpFedLA)."""

    alpha: np.ndarray
    raw: np.ndarray | None


@dataclass
class AlgorithmResult:
    """Outcome of one algorithm: final personalized accuracies and what it cost."""

    name: str
    client_accuracies: list[float]
    mean_accuracy: float
    rounds: int
    wall_seconds: float
    run_id: str | None = None
    layer_weights: np.ndarray | None = None  # pFedLA variants' final α [N, L, N]
    raw_layer_weights: np.ndarray | None = None  # HeurpFedLA's α before the kept layers' one-hot rows
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def client_mean_accuracy(self) -> float:
        """The unweighted mean of ``client_accuracies`` (``mean_accuracy`` weights by test samples)."""
        return client_mean(self.client_accuracies)

    def summary(self) -> dict:
        return {
            "mean_accuracy": self.mean_accuracy,
            "client_mean_accuracy": self.client_mean_accuracy,
            "min_accuracy": min(self.client_accuracies),
            "max_accuracy": max(self.client_accuracies),
            "client_accuracies": self.client_accuracies,
            "rounds": self.rounds,
            "wall_seconds": self.wall_seconds,
            "mlflow_run_id": self.run_id,
        }


@dataclass
class ExperimentResult:
    """All algorithms of one experiment for each of its seeds, and where their outputs are."""

    runs: dict[int, dict[str, AlgorithmResult]]  # seed -> algorithm -> result, in the config's order
    summary: dict  # what summary.json holds
    output_dir: Path
    tracking_uri: str
    identity: str  # the run identity recorded in run.json, checkpoints and MLflow tags

    @property
    def results(self) -> dict[str, AlgorithmResult]:
        """The algorithms' results of a one-seed experiment (several seeds: ``runs[seed]``)."""
        if len(self.runs) != 1:
            raise ValueError(f"the experiment ran {len(self.runs)} seeds: pick one with runs[seed]")
        return next(iter(self.runs.values()))


# -- statistics over seeds ---------------------------------------------------------------------------------

def seed_spread(values: Sequence[float]) -> float | None:
    """The sample standard deviation (n − 1 in the denominator) of one value per seed; None for
    one seed, which has no spread to estimate."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def algorithm_summary(by_seed: dict[int, AlgorithmResult]) -> dict:
    """One algorithm's ``summary.json`` entry: both mean accuracies as mean and standard deviation
    over seeds, the worst and best client of any seed, and every seed's own result."""
    results = list(by_seed.values())
    sample = [r.mean_accuracy for r in results]
    clients = [r.client_mean_accuracy for r in results]
    return {
        "mean_accuracy": float(np.mean(sample)),
        "mean_accuracy_std": seed_spread(sample),
        "client_mean_accuracy": float(np.mean(clients)),
        "client_mean_accuracy_std": seed_spread(clients),
        "min_accuracy": min(min(r.client_accuracies) for r in results),
        "max_accuracy": max(max(r.client_accuracies) for r in results),
        "rounds": results[0].rounds,
        "wall_seconds": sum(r.wall_seconds for r in results),
        "seeds": {str(seed): r.summary() for seed, r in by_seed.items()},
    }


def experiment_summary(runs: dict[int, dict[str, AlgorithmResult]], algorithms: Sequence[str]) -> dict:
    """What ``summary.json`` holds: each algorithm's ``algorithm_summary``, in ``algorithms``' order."""
    return {name: algorithm_summary({seed: by_name[name] for seed, by_name in runs.items()})
            for name in algorithms}


# -- the table ---------------------------------------------------------------------------------------------

TABLE_LEGEND = ("sample acc: correct over all clients' test samples (weighted by test size); "
                "client acc: mean of per-client accuracies (unweighted)")
SPREAD_LEGEND = ("mean ± sample standard deviation over seeds; min/max: the worst and best client of any "
                 "seed; wall s: all seeds together")
TABLE_HEADER = ("algorithm", "sample acc", "client acc", "min acc", "max acc", "seeds", "rounds", "wall s")


def with_spread(mean: float, std: float | None) -> str:
    """``0.9933 ± 0.0012``, or ``0.9933`` without a standard deviation (one seed)."""
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def table_rows(summary: dict) -> list[tuple[str, ...]]:
    """The cells of the summary table, one row per algorithm, under ``TABLE_HEADER``."""
    return [(name, with_spread(e["mean_accuracy"], e["mean_accuracy_std"]),
             with_spread(e["client_mean_accuracy"], e["client_mean_accuracy_std"]),
             f"{e['min_accuracy']:.4f}", f"{e['max_accuracy']:.4f}", str(len(e["seeds"])), str(e["rounds"]),
             f"{e['wall_seconds']:.1f}")
            for name, e in summary.items()]


def format_table(summary: dict, markdown: bool = False) -> str:
    """The summary table of a ``summary.json``: both mean accuracies (mean ± standard deviation over
    seeds when there are several), the worst and best client, as aligned text with a legend telling
    the accuracies apart, or as a Markdown table."""
    rows = table_rows(summary)
    if markdown:
        lines = [f"| {' | '.join(TABLE_HEADER)} |", "|---|" + "---:|" * (len(TABLE_HEADER) - 1)]
        return "\n".join(lines + [f"| {' | '.join(row)} |" for row in rows])
    widths = [max(len(cell) for cell in column) for column in zip(TABLE_HEADER, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        numbers = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([cells[0].ljust(widths[0]), *numbers])

    several = any(len(entry["seeds"]) > 1 for entry in summary.values())
    header = line(TABLE_HEADER)
    return "\n".join([header, "-" * len(header), *map(line, rows), TABLE_LEGEND,
                      *([SPREAD_LEGEND] if several else [])])


# -- the files ---------------------------------------------------------------------------------------------

def write_summary(output_dir: Path, summary: dict) -> Path:
    """``summary.json`` in ``output_dir``, algorithms in the config's order (not sorted)."""
    path = output_dir / rundir.SUMMARY_FILE
    storage.write_bytes(path, json.dumps(summary, indent=2).encode(), root=output_dir)
    return path


def write_layer_weights(folder: Path, name: str, alpha: np.ndarray | None, raw_alpha: np.ndarray | None
                        ) -> None:
    """A pFedLA variant's final α (and HeurpFedLA's raw α) as ``.npy`` files in ``folder``; nothing
    for an algorithm without α."""
    for raw, array in ((False, alpha), (True, raw_alpha)):
        if array is not None:
            buffer = io.BytesIO()
            np.save(buffer, array)
            storage.write_bytes(folder / rundir.layer_weights_file(name, raw), buffer.getvalue(), root=folder)


def result_file(folder: Path, name: str) -> Path:
    return folder / "results" / f"{name}.json"


def write_result(folder: Path, result: AlgorithmResult) -> None:
    """``results/<algorithm>.json``: the result with its per-round history. Its presence marks the
    (algorithm, seed) run finished, so it is written last."""
    storage.write_json(result_file(folder, result.name), {**result.summary(), "history": result.history},
                       root=folder)


def read_result(folder: Path, name: str, config: ExperimentConfig) -> AlgorithmResult | None:
    """A finished run's result read back from ``folder`` (None when it has not finished), every value
    checked against ``config``, the (algorithm, seed) run's own config (``readback``)."""
    path = result_file(folder, name)
    if not path.is_file():
        return None
    weights_files = [folder / rundir.layer_weights_file(name, raw) for raw in (False, True)]
    try:
        saved = readback.check_result(storage.read_json(path), path, config)
        weights = [readback.load_alpha(file, config) if file.is_file() else None for file in weights_files]
    except ArtifactError as error:
        raise ArtifactError(f"{error}; start over with --overwrite") from None
    return AlgorithmResult(
        name=name, client_accuracies=saved["client_accuracies"], mean_accuracy=saved["mean_accuracy"],
        rounds=saved["rounds"], wall_seconds=saved["wall_seconds"], run_id=saved["mlflow_run_id"],
        layer_weights=weights[0], raw_layer_weights=weights[1], history=saved["history"],
    )
