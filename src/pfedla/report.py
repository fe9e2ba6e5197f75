"""The experiment report: ``report.md`` and PNG figures, from a finished run's output directory.

Each figure comes from a function that returns a matplotlib ``Figure`` (so a test can count its
curves) and draws any set of algorithms, one seed or several: a line is the mean over seeds,
the band around it one sample standard deviation. ``write_report`` reads what ``pfedla run``
wrote (summary.json, run.json, each seed's results, partition and α) and writes ``report.md``
and ``figures/*.png`` beside them; nothing is recomputed from the models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pfedla import readback, rundir, storage
from pfedla.config import ExperimentConfig, run_seeds
from pfedla.errors import PfedlaError
from pfedla.figures import alpha_heatmap_figure, png_bytes
from pfedla.models import CONVOLUTIONAL, LayerLayout, build_model
from pfedla.results import format_table

REPORT_FILE = "report.md"
FIGURES_DIR = "figures"
ACCURACY_FIGURE = "accuracy.png"
CLIENT_FIGURE = "client_accuracy.png"
BYTES_FIGURE = "accuracy_vs_bytes.png"
ALPHA_TRAINING_FIGURE = "alpha_training.png"
# Ordering clients costs O(N³) and a heatmap of thousands of rows shows no structure.
MAX_HEATMAP_CLIENTS = 1000
# The two mean accuracies every round records, with how the report names them.
ACCURACY_METRICS = (("accuracy_mean", "sample acc (weighted by test samples)"),
                    ("accuracy_client_mean", "client acc (unweighted mean over clients)"))
ALPHA_METRICS = (("alpha_self_weight", "α self-weight (mean over clients and layers)"),
                 ("alpha_entropy", "α entropy (mean over clients and layers)"))
MIB = 2**20

History = list[dict[str, float]]  # one algorithm's metrics per round, as results/<algorithm>.json holds


def alpha_figure_name(algorithm: str, seed: int) -> str:
    return f"alpha_{algorithm}_seed_{seed}.png"


def report_files(algorithms: Sequence[str], seeds: Sequence[int]) -> list[str]:
    """Every file (relative to ``output_dir``) a report of ``algorithms`` over ``seeds`` can write."""
    figures = [ACCURACY_FIGURE, CLIENT_FIGURE, BYTES_FIGURE, ALPHA_TRAINING_FIGURE]
    figures += [alpha_figure_name(name, seed) for name in algorithms for seed in seeds]
    return [REPORT_FILE, *(f"{FIGURES_DIR}/{name}" for name in figures)]


# -- what the report reads ---------------------------------------------------------------------------------

@dataclass
class RunData:
    """A finished run's outputs, as the report needs them."""

    config: ExperimentConfig
    identity: str
    summary: dict  # summary.json
    seeds: list[int]
    histories: dict[str, dict[int, History]]  # algorithm -> seed -> per-round metrics
    class_counts: dict[int, np.ndarray]  # seed -> [clients, classes] train samples per class
    alphas: dict[str, dict[int, tuple[np.ndarray, bool]]]  # pFedLA variant -> seed -> (final α, raw)


def load_run(output_dir: str | Path) -> RunData:
    """Read a finished run of ``pfedla run`` from ``output_dir``: only the algorithms and seeds its
    run.json records, every value checked (``readback``) before anything is drawn."""
    directory = Path(output_dir)
    summary_path = directory / rundir.SUMMARY_FILE
    if not summary_path.is_file():
        raise PfedlaError(f"{directory} holds no finished pfedla run (no {rundir.SUMMARY_FILE}); an "
                          f"interrupted one finishes with `pfedla run --resume {directory}`")
    record = rundir.read_record(directory)
    config = record.config
    summary = readback.check_summary(storage.read_json(summary_path), summary_path, config)
    seeds = run_seeds(config)
    histories = {name: {seed: _history(directory, name, seed, config) for seed in seeds} for name in summary}
    counts = {seed: _class_counts(directory, seed, config) for seed in seeds}
    alphas: dict[str, dict[int, tuple[np.ndarray, bool]]] = {}
    for name in summary:
        for seed in seeds:
            if (found := _alpha(directory, name, seed, config)) is not None:
                alphas.setdefault(name, {})[seed] = found
    return RunData(config, record.identity, summary, seeds, histories, counts, alphas)


def _history(directory: Path, name: str, seed: int, config: ExperimentConfig) -> History:
    path = rundir.seed_dir(directory, seed) / "results" / f"{name}.json"
    return readback.check_result(storage.read_json(path), path, config)["history"]


def _class_counts(directory: Path, seed: int, config: ExperimentConfig) -> np.ndarray:
    path = rundir.seed_dir(directory, seed) / rundir.PARTITION_FILE
    return readback.check_partition(storage.read_json(path), path, config)


def _alpha(directory: Path, name: str, seed: int, config: ExperimentConfig) -> tuple[np.ndarray, bool] | None:
    """A pFedLA variant's final α, HeurpFedLA's before its one-hot rows when there is one (the trust
    the hypernetworks learned); None for an algorithm without α."""
    for raw in (True, False):
        path = rundir.seed_dir(directory, seed) / rundir.layer_weights_file(name, raw)
        if path.is_file():
            return readback.load_alpha(path, config), raw
    return None


# -- series over seeds -------------------------------------------------------------------------------------

def seed_series(by_seed: dict[int, History], metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The rounds (counted from 1) at which every seed recorded ``metric``, and the values there as
    ``[seeds, rounds]``; None when no round has it in every seed."""
    histories = list(by_seed.values())
    rounds = sorted(set.intersection(*({i + 1 for i, m in enumerate(h) if metric in m} for h in histories)))
    if not rounds:
        return None
    return np.array(rounds), np.array([[h[r - 1][metric] for r in rounds] for h in histories], dtype=float)


def cumulative_mib(history: History) -> np.ndarray:
    """Bytes sent down and up so far, after each round, in MiB."""
    sent = [entry.get("bytes_down", 0.0) + entry.get("bytes_up", 0.0) for entry in history]
    return np.cumsum(sent) / MIB


def _line_with_band(ax: Axes, x: np.ndarray, values: np.ndarray, label: str) -> None:
    """The mean over seeds (rows of ``values``) as a line, ± one sample standard deviation as a band."""
    mean = values.mean(axis=0)
    (line,) = ax.plot(x, mean, marker="." if len(x) <= 30 else None, label=label)
    if len(values) > 1:
        spread = values.std(axis=0, ddof=1)
        ax.fill_between(x, mean - spread, mean + spread, color=line.get_color(), alpha=0.2, linewidth=0)


def _seeds_note(histories: dict[str, dict[int, History]]) -> str:
    seeds = len(next(iter(histories.values())))
    return f"mean over {seeds} seeds ± one standard deviation" if seeds > 1 else "one seed"


# -- figures -----------------------------------------------------------------------------------------------

def accuracy_figure(histories: dict[str, dict[int, History]]) -> Figure:
    """Both mean accuracies per evaluated round: one axes each, one line (and band) per algorithm."""
    return _per_round_figure(histories, ACCURACY_METRICS,
                             f"Personalized test accuracy per round ({_seeds_note(histories)})")


def _per_round_figure(histories: dict[str, dict[int, History]], metrics: Sequence[tuple[str, str]],
                      title: str) -> Figure:
    """One axes per (metric, label), one line (and band over seeds) per algorithm, against the round."""
    figure = Figure(figsize=(11, 4), layout="constrained")
    for ax, (metric, label) in zip(figure.subplots(1, len(metrics)), metrics, strict=True):
        for name, by_seed in histories.items():
            if (series := seed_series(by_seed, metric)) is not None:
                _line_with_band(ax, *series, name)
        ax.set(xlabel="round", ylabel=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    return figure


def bytes_figure(histories: dict[str, dict[int, History]]) -> Figure:
    """Both mean accuracies against the bytes sent so far (down + up), one line per algorithm."""
    figure = Figure(figsize=(11, 4), layout="constrained")
    for ax, (metric, label) in zip(figure.subplots(1, 2), ACCURACY_METRICS, strict=True):
        for name, by_seed in histories.items():
            if (series := seed_series(by_seed, metric)) is None:
                continue
            rounds, values = series
            # seeds send the same model sizes; their schedules may differ a little: the mean
            sent = np.mean([cumulative_mib(h)[rounds - 1] for h in by_seed.values()], axis=0)
            _line_with_band(ax, sent, values, name)
        ax.set(xlabel="MiB communicated (down + up, cumulative)", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(f"Accuracy versus communication ({_seeds_note(histories)})", fontsize=10)
    return figure


def client_accuracy_figure(summary: dict) -> Figure:
    """Every client's final accuracy, one column of points per algorithm (all seeds' clients), and
    a bar at the algorithm's client acc (the unweighted mean over clients, then over seeds)."""
    figure = Figure(figsize=(max(5.0, 1.3 * len(summary) + 2), 4), layout="constrained")
    ax = figure.subplots()
    for index, entry in enumerate(summary.values()):
        accuracies = np.concatenate([seed["client_accuracies"] for seed in entry["seeds"].values()])
        # spread the points evenly by rank: reproducible, and equal accuracies stay visible
        offsets = np.zeros(len(accuracies))
        offsets[np.argsort(accuracies, kind="stable")] = np.linspace(-0.25, 0.25, len(accuracies))
        ax.scatter(index + offsets, accuracies, s=12, alpha=0.6)
        ax.plot([index - 0.35, index + 0.35], [entry["client_mean_accuracy"]] * 2, color="black")
    ax.set_xticks(range(len(summary)), list(summary))
    ax.set(ylabel="final personalized test accuracy", xlim=(-0.6, len(summary) - 0.4))
    ax.grid(axis="y", alpha=0.3)
    seeds = len(next(iter(summary.values()))["seeds"])
    ax.set_title(f"Per-client final accuracy ({seeds} seed{'s' if seeds > 1 else ''}); bar: client acc",
                 fontsize=10)
    return figure


def alpha_training_figure(histories: dict[str, dict[int, History]]) -> Figure | None:
    """pFedLA's α self-weight and entropy per round, one line per variant; None without pFedLA."""
    variants = {name: by_seed for name, by_seed in histories.items()
                if seed_series(by_seed, ALPHA_METRICS[0][0]) is not None}
    if not variants:
        return None
    return _per_round_figure(variants, ALPHA_METRICS, f"How α evolves ({_seeds_note(variants)})")


def similarity_order(class_counts: np.ndarray) -> list[int]:
    """Clients in the leaf order of average-linkage hierarchical clustering of the cosine similarity
    of their class counts, so clients with alike data sit side by side.

    Every step merges the two most similar clusters, turned so that their most similar ends meet.
    """
    vectors = np.asarray(class_counts, dtype=float)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    similarity = unit @ unit.T
    linkage = similarity.copy()
    np.fill_diagonal(linkage, -np.inf)
    leaves = {i: [i] for i in range(len(vectors))}
    while len(leaves) > 1:
        a, b = (int(i) for i in np.unravel_index(np.argmax(linkage), linkage.shape))
        left, right = leaves.pop(a), leaves.pop(b)
        joins = [left + right, left + right[::-1], left[::-1] + right, left[::-1] + right[::-1]]
        leaves[a] = max(joins, key=lambda order: similarity[order[len(left) - 1], order[len(left)]])
        # average linkage: the merged cluster's similarity to each other cluster, weighted by size
        linkage[a] = (len(left) * linkage[a] + len(right) * linkage[b]) / (len(left) + len(right))
        linkage[:, a] = linkage[a]
        linkage[a, a] = -np.inf
        linkage[b, :] = linkage[:, b] = -np.inf
    return next(iter(leaves.values()), [])


def layer_names(model: str, layers: int) -> list[str]:
    """The names of the model's ``layers`` layers (input sizes do not change them), or numbers when
    the architecture does not match."""
    shape = (1, 8, 8) if model in CONVOLUTIONAL else (4,)
    names = LayerLayout.of(build_model(model, shape, 2, seed=0)).names
    return list(names) if len(names) == layers else [f"layer {i}" for i in range(layers)]


# -- report.md ---------------------------------------------------------------------------------------------

def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def seed_table(summary: dict) -> list[str]:
    """Every (algorithm, seed) run's final accuracies as Markdown."""
    rows = ["| algorithm | seed | sample acc | client acc | min acc | max acc | wall s |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, entry in summary.items():
        for seed, e in entry["seeds"].items():
            rows.append(f"| {name} | {seed} | {_number(e['mean_accuracy'])} "
                        f"| {_number(e['client_mean_accuracy'])} | {_number(e['min_accuracy'])} "
                        f"| {_number(e['max_accuracy'])} | {e['wall_seconds']:.1f} |")
    return rows


def markdown(data: RunData, figures: dict[str, str], heatmaps: list[tuple[str, str]],
             notes: list[str]) -> str:
    """report.md: the tables, then each figure with what it shows; ``figures`` maps a figure's
    file name to its path relative to the report, ``heatmaps`` lists (path, caption)."""
    config, several = data.config, len(data.seeds) > 1
    lines = [
        f"# pfedla report: run {data.identity}",
        "",
        f"{config.dataset}, {config.partition.kind} partition, {config.clients} clients, "
        f"{config.rounds} rounds, model {config.model}; seeds {', '.join(map(str, data.seeds))}.",
        "",
        "## Final accuracy",
        "",
        "*sample acc* is the personalized test accuracy over all clients' test samples (weighted by each "
        "client's test size); *client acc* is the unweighted mean of the clients' accuracies. "
        + ("Each is the mean over seeds ± its sample standard deviation (n − 1); min/max are the worst "
           "and best client of any seed, wall s all seeds together." if several else
           "One seed: no standard deviation."),
        "",
        format_table(data.summary, markdown=True),
        "",
        "### Per seed",
        "",
        *seed_table(data.summary),
        "",
        "## Accuracy per round",
        "",
        "Left: sample acc, right: client acc, at every evaluated round"
        + (" (line: mean over seeds, band: ± one standard deviation)." if several else "."),
        "",
        f"![accuracy per round]({figures[ACCURACY_FIGURE]})",
        "",
        "## Per-client final accuracy",
        "",
        "Each point is one client's final personalized accuracy" + (" in one seed" if several else "")
        + "; the bar is the algorithm's client acc.",
        "",
        f"![per-client final accuracy]({figures[CLIENT_FIGURE]})",
        "",
        "## Accuracy versus bytes communicated",
        "",
        "Both accuracies against the bytes sent so far, down and up (the sum of each round's `bytes_down` "
        "and `bytes_up`), at every evaluated round.",
        "",
        f"![accuracy versus bytes]({figures[BYTES_FIGURE]})",
    ]
    if ALPHA_TRAINING_FIGURE in figures:
        lines += ["", "## pFedLA's α", "",
                  "α self-weight is the weight a client gives its own model, entropy how evenly it spreads "
                  "its trust (both averaged over clients and layers, every round).", "",
                  f"![alpha self-weight and entropy]({figures[ALPHA_TRAINING_FIGURE]})"]
    for path, caption in heatmaps:
        lines += ["", caption, "", f"![α heatmaps]({path})"]
    lines += [f"\n{note}" for note in notes]
    return "\n".join(lines) + "\n"


def _heatmaps(data: RunData) -> tuple[dict[str, Figure], list[tuple[str, str]], list[str]]:
    """Every pFedLA variant's α heatmaps per seed, their captions, and notes on what was left out."""
    figures, captions, notes = {}, [], []
    for name, by_seed in data.alphas.items():
        for seed, (alpha, raw) in by_seed.items():
            if alpha.shape[0] > MAX_HEATMAP_CLIENTS:
                notes.append(f"α heatmaps of {name}, seed {seed}, left out: {alpha.shape[0]} clients "
                             f"(more than {MAX_HEATMAP_CLIENTS}).")
                continue
            order = similarity_order(data.class_counts[seed])
            kind = "before HeurpFedLA's one-hot rows (the learned trust)" if raw else "as aggregated with"
            file = alpha_figure_name(name, seed)
            figures[file] = alpha_heatmap_figure(
                alpha, order, layer_names(data.config.model, alpha.shape[1]),
                f"{name} final α {kind}, seed {seed}; clients ordered by class-distribution similarity")
            captions.append((f"{FIGURES_DIR}/{file}",
                             f"{name}, seed {seed}: final α per layer {kind}; row i is client i's weights "
                             f"over source clients j. Clients in order {', '.join(map(str, order))} "
                             "(hierarchical clustering of the cosine similarity of their class counts)."))
    return figures, captions, notes


def write_report(output_dir: str | Path) -> list[Path]:
    """Write ``report.md`` and ``figures/*.png`` for the finished run in ``output_dir``; returns
    the files written."""
    directory = Path(output_dir)
    data = load_run(directory)
    figures = {ACCURACY_FIGURE: accuracy_figure(data.histories), BYTES_FIGURE: bytes_figure(data.histories),
               CLIENT_FIGURE: client_accuracy_figure(data.summary)}
    if (alpha_training := alpha_training_figure(data.histories)) is not None:
        figures[ALPHA_TRAINING_FIGURE] = alpha_training
    heatmaps, captions, notes = _heatmaps(data)
    written = []
    for file, figure in {**figures, **heatmaps}.items():
        path = directory / FIGURES_DIR / file
        storage.write_bytes(path, png_bytes(figure), root=directory)  # never through a linked figures/
        written.append(path)
    text = markdown(data, {file: f"{FIGURES_DIR}/{file}" for file in figures}, captions, notes)
    storage.write_bytes(directory / REPORT_FILE, text.encode(), root=directory)
    return [directory / REPORT_FILE, *written]
