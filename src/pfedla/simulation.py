"""The in-process round loop: every listed algorithm on the same partition, seed and clients, once
per seed of the experiment."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pfedla import readback, report, rundir, storage
from pfedla.algorithms import ClientRule, ClientState, FitInstruction, Strategy, make_strategy
from pfedla.algorithms.base import Generators
from pfedla.algorithms.pfedla import PFedLAStrategy
from pfedla.checkpoint import CheckpointStore
from pfedla.client import (
    ClientFailure,
    ClientUpdate,
    EvalResult,
    LocalTrainer,
    ModelState,
    TrainSettings,
    evaluate_client,
    failure_reason,
    screen_updates,
    select_device,
)
from pfedla.config import ExperimentConfig, experiment_key, run_seeds, seed_config
from pfedla.data import FederatedData, build_federated_data
from pfedla.errors import ArtifactError, PfedlaError
from pfedla.models import LayerLayout, build_model, initial_buffers, initial_layers
from pfedla.progress import RoundProgress
from pfedla.seeding import numpy_rng, torch_generator
from pfedla.tracking import (
    FINAL_CLIENT_MEAN_METRIC,
    FINAL_METRIC,
    Tracker,
    default_tracking_uri,
    relocate_local_store,
)

log = logging.getLogger(__name__)


def participants(config: ExperimentConfig, round_idx: int) -> list[int]:
    """The round's clients: a seeded draw, identical for every algorithm and orchestration."""
    count = max(1, round(config.participation * config.clients))
    if count >= config.clients:
        return list(range(config.clients))
    rng = numpy_rng(config.seed, "participants", round_idx)
    return sorted(int(c) for c in rng.choice(config.clients, size=count, replace=False))


def train_settings(config: ExperimentConfig, proximal_mu: float = 0.0) -> TrainSettings:
    return TrainSettings(epochs=config.local_epochs, batch_size=config.batch_size, lr=config.lr,
                         timeout=config.client_timeout, proximal_mu=proximal_mu)


def client_generators(config: ExperimentConfig, round_idx: int, client_id: int) -> Generators:
    """The client's random streams (batch orders) of one round: pure functions of (seed, stream,
    round, client), so both orchestrations and all algorithms see the same batches."""
    return lambda stream: torch_generator(config.seed, stream, round_idx, client_id)


def fit_client(
    rule: ClientRule,
    trainer: LocalTrainer,
    instruction: FitInstruction,
    state: ClientState,
    train: tuple[torch.Tensor, torch.Tensor],
    config: ExperimentConfig,
    round_idx: int,
    client_id: int,
) -> tuple[ClientUpdate, ClientState]:
    """One client's local training on its train split ``(x, y)`` this round: its update
    Δ = θ' − θ̄ (None on the layers it keeps private) and its new state."""
    settings = train_settings(config, instruction.proximal_mu)
    trained, loss, new_state = rule.fit(trainer, instruction, state, train, settings,
                                        client_generators(config, round_idx, client_id))
    delta = [None if start is None else after - start
             for after, start in zip(trained.layers, instruction.layers, strict=True)]
    return ClientUpdate(client_id, len(train[1]), delta, loss), new_state


def personalize_clients(strategy: Strategy, trainer: LocalTrainer, states: Sequence[ClientState],
                        trains: Sequence[tuple[torch.Tensor, torch.Tensor] | None], config: ExperimentConfig,
                        rounds_done: int) -> list[ModelState]:
    """Each client's evaluated model: the server's personalized layers completed by the client's rule
    (its private layers and buffers, Ditto's personal model, fedavg_ft's fine-tuning)."""
    rule, settings = strategy.client_rule, train_settings(config)
    return [rule.personalize(trainer, strategy.personalized_layers(i), state, trains[i], settings,
                             client_generators(config, rounds_done, i))
            for i, state in enumerate(states)]


def evaluate_models(model: nn.Module, layout: LayerLayout, models: Sequence[ModelState],
                    tests: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[EvalResult]:
    """Each client's model on that client's own test split ``(x, y)``."""
    return [evaluate_client(model, layout, state, x, y) for state, (x, y) in zip(models, tests, strict=True)]


CLIENT_PREFIX = "client."


def client_state_tensors(states: Sequence[ClientState]) -> dict[str, torch.Tensor]:
    """Every client's state as named tensors ``client.<i>.<name>`` (beside the server state in a
    simulation checkpoint: the simulation plays every client too)."""
    return {f"{CLIENT_PREFIX}{i}.{name}": t
            for i, state in enumerate(states) for name, t in state.tensors().items()}


def load_client_states(tensors: dict[str, torch.Tensor], initial: Sequence[ClientState]) -> list[ClientState]:
    """``client_state_tensors`` output back as states shaped like ``initial``."""
    by_client: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith(CLIENT_PREFIX):
            client, _, name = key[len(CLIENT_PREFIX):].partition(".")
            by_client.setdefault(client, {})[name] = tensor
    return [ClientState.from_tensors(by_client.get(str(i), {}), like) for i, like in enumerate(initial)]


def round_metrics(updates: Sequence[ClientUpdate], failures: Sequence[ClientFailure],
                  bytes_down: float) -> dict[str, float]:
    """What a round's client phase looked like: participation, failures, loss, bytes sent."""
    return {
        "clients": float(len(updates) + len(failures)),
        "failed_clients": float(len(failures)),
        "bytes_down": float(bytes_down),
        "bytes_up": float(sum(u.bytes_sent() for u in updates)),
        # a round without updates has no training loss: left out rather than NaN, which
        # strict JSON (and the KFP launcher) refuses
        **({"train_loss": float(np.mean([u.train_loss for u in updates]))} if updates else {}),
    }


class RunAborted(PfedlaError):
    """Too many clients failed in one round to trust its aggregate."""


def report_failures(round_idx: int, failures: Sequence[ClientFailure], selected: int,
                    max_failed_fraction: float) -> None:
    """Log each left-out client; abort when more than ``max_failed_fraction`` of the round failed."""
    for failure in failures:
        log.warning("round %d: client %d left out: %s", round_idx, failure.client_id, failure.reason)
    if len(failures) > max_failed_fraction * selected:
        raise RunAborted(
            f"round {round_idx}: {len(failures)} of {selected} clients failed, more than "
            f"max_failed_fraction={max_failed_fraction}; first reason: {failures[0].reason}"
        )


def personalized_models(models: Sequence[ModelState], layout: LayerLayout) -> dict[str, torch.Tensor]:
    """Every client's evaluated model as named tensors ``client<i>.<parameter or buffer>``."""
    return {
        f"client{i}.{name}": tensor
        for i, state in enumerate(models)
        for name, tensor in {**layout.unflatten(state.layers), **state.buffers}.items()
    }


def client_mean(accuracies: Sequence[float]) -> float:
    """The unweighted mean of per-client accuracies: every client counts once, whatever its test
    size (what pFL papers report as the average personalized accuracy)."""
    return sum(accuracies) / len(accuracies)


def alpha_arrays(strategy: PFedLAStrategy) -> tuple[np.ndarray, np.ndarray | None]:
    """α as aggregated with, and HeurpFedLA's α before its one-hot rows (None without HeurpFedLA)."""
    raw = strategy.raw_layer_weights()
    return strategy.layer_weights().cpu().numpy(), None if raw is None else raw.cpu().numpy()


def accuracy_metrics(results: Sequence[EvalResult]) -> dict[str, float]:
    """Mean accuracy weighted by test samples (``accuracy_mean``) and over clients
    (``accuracy_client_mean``), the sample-weighted mean loss, and the worst and best client."""
    accuracies = [r.accuracy for r in results]
    total = sum(r.count for r in results)
    return {
        "accuracy_mean": sum(r.correct for r in results) / total,
        "accuracy_client_mean": client_mean(accuracies),
        "accuracy_min": min(accuracies),
        "accuracy_max": max(accuracies),
        "loss_mean": sum(r.loss_sum for r in results) / total,
    }


@dataclass
class AlgorithmResult:
    """Outcome of one algorithm: final personalized accuracies and what it cost."""

    name: str
    client_accuracies: list[float]
    mean_accuracy: float
    rounds: int
    wall_seconds: float
    run_id: str | None = None
    layer_weights: np.ndarray | None = None
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


class Simulation:
    """Runs strategies round by round over one fixed federated dataset."""

    def __init__(self, config: ExperimentConfig, data: FederatedData, device: torch.device,
                 tracker: Tracker | None, progress: bool = True, checkpoints: CheckpointStore | None = None,
                 parent_run_id: str | None = None):
        self.config, self.device, self.tracker, self.progress = config, device, tracker, progress
        self.checkpoints = checkpoints
        self.parent_run_id = parent_run_id  # the MLflow run grouping the experiment's runs
        self.shards = [shard.to(device) for shard in data.shards]
        self.tests = [shard.test for shard in self.shards]
        self.model = build_model(config.model, data.input_shape, data.num_classes, config.seed).to(device)
        self.layout = LayerLayout.of(self.model)
        self.init_model = ModelState(initial_layers(self.model), initial_buffers(self.model))
        self.trainer = LocalTrainer(self.model, self.layout)
        self.output_dir = Path(config.output_dir)

    def run(self, name: str, identity: str, resume: bool = False) -> AlgorithmResult:
        """Run all rounds of one algorithm, or continue it from its newest good checkpoint."""
        config = self.config
        strategy, states = self.start(name)
        first_round, history, earlier_seconds, run_id = 0, [], 0.0, None
        checkpoint = self.checkpoints.latest(name) if (resume and self.checkpoints) else None
        if checkpoint is not None:
            strategy.load_state_dict(checkpoint.tensors)
            states = load_client_states(checkpoint.tensors, states)
            first_round, history = checkpoint.rounds_done, list(checkpoint.meta["history"])
            earlier_seconds, run_id = checkpoint.meta["seconds"], checkpoint.meta["mlflow_run_id"]
            log.info("%s: resuming after round %d from %s", name, first_round, checkpoint.location)
        elif resume:
            log.warning("%s: no usable checkpoint of this run: starting at round 0", name)
        self.start_tracking(name, identity, run_id, history, resume)
        started = time.perf_counter()
        progress = RoundProgress(name, first_round, config.rounds, enabled=self.progress)
        evaluation: list[EvalResult] = []
        for round_idx in range(first_round, config.rounds):
            metrics = self.run_round(strategy, states, round_idx)
            last = round_idx == config.rounds - 1
            if last or (round_idx + 1) % config.eval_every == 0:
                models, evaluation = self.evaluate(strategy, states, round_idx + 1)
                metrics.update(accuracy_metrics(evaluation))
            progress.round_done(round_idx, metrics)
            history.append(metrics)
            self.track_round(strategy, round_idx, metrics, last)
            if self.checkpoints and (last or (round_idx + 1) % config.checkpoint_every == 0):
                self.checkpoints.save(name, round_idx + 1, self.full_state(strategy, states), {
                    "history": history, "mlflow_run_id": self.tracker.run_id if self.tracker else None,
                    "seconds": earlier_seconds + time.perf_counter() - started})
        progress.close()
        if not evaluation:  # resumed after the last round had been checkpointed
            models, evaluation = self.evaluate(strategy, states, config.rounds)
        result = AlgorithmResult(
            name=name,
            client_accuracies=[r.accuracy for r in evaluation],
            mean_accuracy=accuracy_metrics(evaluation)["accuracy_mean"],
            rounds=config.rounds,
            wall_seconds=earlier_seconds + time.perf_counter() - started,
            run_id=self.tracker.run_id if self.tracker else None,
            history=history,
        )
        if isinstance(strategy, PFedLAStrategy):
            result.layer_weights, result.raw_layer_weights = alpha_arrays(strategy)
        self.save_outputs(self.full_state(strategy, states), models, result)
        return result

    def start(self, name: str) -> tuple[Strategy, list[ClientState]]:
        """A fresh server state of algorithm ``name`` and every client's initial state."""
        strategy = make_strategy(name, self.config, self.model)
        rule = strategy.client_rule
        return strategy, [rule.initial_state(self.init_model) for _ in range(self.config.clients)]

    def evaluate(self, strategy: Strategy, states: Sequence[ClientState], rounds_done: int
                 ) -> tuple[list[ModelState], list[EvalResult]]:
        """Every client's evaluated model and its result on the client's own test split."""
        trains = [shard.train for shard in self.shards]
        models = personalize_clients(strategy, self.trainer, states, trains, self.config, rounds_done)
        return models, evaluate_models(self.model, self.layout, models, self.tests)

    @staticmethod
    def full_state(strategy: Strategy, states: Sequence[ClientState]) -> dict[str, torch.Tensor]:
        """The server state and every client's state: all a resume needs."""
        return {**strategy.state_dict(), **client_state_tensors(states)}

    def start_tracking(self, name: str, identity: str, run_id: str | None,
                       history: list[dict[str, float]], resume: bool) -> None:
        """Open the algorithm's MLflow run, or reopen it and send the rounds it is missing.

        A resume first ends, as KILLED, any other run of this run and algorithm still marked
        RUNNING (one whose checkpoint was lost), so no orphan is left behind.
        """
        if not self.tracker:
            return
        tags = {"pfedla.run": identity, "pfedla.algorithm": name, "pfedla.seed": str(self.config.seed)}
        if resume:
            for orphan in self.tracker.close_running(tags, keep=run_id):
                log.warning("%s: MLflow run %s had no usable checkpoint: marked KILLED", name, orphan)
        if run_id is None:
            parent = {"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else {}
            self.tracker.start_run(f"{name} seed {self.config.seed}", self.config.flat_params(), {
                **tags, **parent, "pfedla.experiment_key": experiment_key(self.config),
                "pfedla.orchestration": "simulation"})
            return
        logged_through = self.tracker.resume_run(run_id)
        for round_idx, metrics in enumerate(history):
            if round_idx > logged_through:
                self.tracker.log_metrics(round_idx, metrics)

    def track_round(self, strategy: Strategy, round_idx: int, metrics: dict[str, float], last: bool) -> None:
        """Queue the round's metrics; α arrays and heatmaps every ``heatmap_every`` rounds and at the end."""
        if not self.tracker:
            return
        self.tracker.log_metrics(round_idx, metrics)
        heatmap_due = last or (round_idx + 1) % self.config.heatmap_every == 0
        if isinstance(strategy, PFedLAStrategy) and heatmap_due:
            alpha, raw = alpha_arrays(strategy)
            self.tracker.log_layer_weights(alpha, self.layout.names, f"round_{round_idx + 1:04d}", raw)

    def train_round_clients(self, rule: ClientRule, instructions: dict[int, FitInstruction],
                            states: list[ClientState], round_idx: int
                            ) -> tuple[list[ClientUpdate], list[ClientFailure]]:
        """Every selected client's update; one that raises, times out or sends a bad update is left out.

        A client whose training finished keeps its new state even if the server refuses its update
        (the state never left it); one whose training failed keeps its old state.
        """
        delivered, failures = [], []
        for client, instruction in instructions.items():
            try:
                update, states[client] = fit_client(rule, self.trainer, instruction, states[client],
                                                    self.shards[client].train, self.config, round_idx, client)
                delivered.append(update)
            except Exception as error:  # one client's crash must not take the round down
                failures.append(ClientFailure(client, failure_reason(error)))
        config = self.config
        updates, refused = screen_updates(delivered, config.max_update_norm, config.update_norm_ratio)
        failures = sorted(failures + refused, key=lambda f: f.client_id)
        report_failures(round_idx, failures, len(instructions), self.config.max_failed_fraction)
        return updates, failures

    def run_round(self, strategy: Strategy, states: list[ClientState], round_idx: int) -> dict[str, float]:
        """Configure, train every selected client, aggregate; returns the round's metrics."""
        started = time.perf_counter()
        clients = participants(self.config, round_idx)
        instructions = strategy.configure_fit(round_idx, clients)
        updates, failures = self.train_round_clients(strategy.client_rule, instructions, states, round_idx)
        metrics = strategy.aggregate_fit(round_idx, updates, failures)
        bytes_down = sum(i.bytes_sent() for i in instructions.values())
        metrics.update(round_metrics(updates, failures, bytes_down))
        metrics["round_seconds"] = time.perf_counter() - started
        return metrics

    def save_outputs(self, state: dict[str, torch.Tensor], models: Sequence[ModelState],
                     result: AlgorithmResult) -> None:
        """Personalized models and server state as safetensors, α as .npy for pFedLA, the MLflow run
        ended, and last the result file: its presence marks the algorithm finished, so a kill at
        any point before it makes a resume redo (idempotently) every step here."""
        model_path = self.output_dir / "models" / f"{result.name}.safetensors"
        storage.save_tensors(model_path, personalized_models(models, self.layout),
                             {"algorithm": result.name, "model": self.config.model,
                              "clients": self.config.clients}, root=self.output_dir)
        state_path = self.output_dir / "checkpoints" / f"{result.name}.safetensors"
        storage.save_tensors(state_path, state,
                             {"algorithm": result.name, "rounds": result.rounds}, root=self.output_dir)
        for raw, weights in ((False, result.layer_weights), (True, result.raw_layer_weights)):
            if weights is not None:
                buffer = io.BytesIO()
                np.save(buffer, weights)
                storage.write_bytes(self.output_dir / rundir.layer_weights_file(result.name, raw),
                                    buffer.getvalue(), root=self.output_dir)
        if self.tracker:
            self.tracker.log_file(model_path, "models")
            self.tracker.log_file(state_path, "checkpoint")
            self.tracker.log_metrics(self.config.rounds, {
                FINAL_METRIC: result.mean_accuracy, FINAL_CLIENT_MEAN_METRIC: result.client_mean_accuracy,
                "wall_seconds": result.wall_seconds})
            self.tracker.end_run()
        storage.write_json(self.output_dir / "results" / f"{result.name}.json",
                           {**result.summary(), "history": result.history}, root=self.output_dir)


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


TABLE_LEGEND = ("sample acc: correct over all clients' test samples (weighted by test size); "
                "client acc: mean of per-client accuracies (unweighted)")
SPREAD_LEGEND = ("mean ± sample standard deviation over seeds; min/max: the worst and best client of any "
                 "seed; wall s: all seeds together")


def with_spread(mean: float, std: float | None) -> str:
    """``0.9933 ± 0.0012``, or ``0.9933`` without a standard deviation (one seed)."""
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def format_table(summary: dict) -> str:
    """The closing table from a ``summary.json``: one row per algorithm, both mean accuracies (mean ±
    standard deviation over seeds when there are several), and a legend telling them apart."""
    header = (f"{'algorithm':<14}{'sample acc':>17}{'client acc':>17}{'min acc':>10}{'max acc':>10}"
              f"{'seeds':>7}{'rounds':>8}{'wall s':>9}")
    rows = [header, "-" * len(header)]
    for name, entry in summary.items():
        rows.append(
            f"{name:<14}{with_spread(entry['mean_accuracy'], entry['mean_accuracy_std']):>17}"
            f"{with_spread(entry['client_mean_accuracy'], entry['client_mean_accuracy_std']):>17}"
            f"{entry['min_accuracy']:>10.4f}{entry['max_accuracy']:>10.4f}{len(entry['seeds']):>7d}"
            f"{entry['rounds']:>8d}{entry['wall_seconds']:>9.1f}"
        )
    several = any(len(entry["seeds"]) > 1 for entry in summary.values())
    return "\n".join([*rows, TABLE_LEGEND, *([SPREAD_LEGEND] if several else [])])


def _finished_result(output_dir: Path, name: str, config: ExperimentConfig) -> AlgorithmResult | None:
    """A finished (algorithm, seed) of ``config``'s run read back from its seed folder, every value
    checked against the run (``readback``); None when it has not finished."""
    path = output_dir / "results" / f"{name}.json"
    if not path.is_file():
        return None
    weights_files = [output_dir / rundir.layer_weights_file(name, raw) for raw in (False, True)]
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


def _finished_results(config: ExperimentConfig, output_dir: Path) -> dict[tuple[int, str], AlgorithmResult]:
    """Every finished (seed, algorithm) of ``config``'s run in ``output_dir``, read back and checked."""
    done = {}
    for seed in run_seeds(config):
        seed_run = _seed_run_config(config, output_dir, seed)
        for name in config.algorithms:
            if (result := _finished_result(Path(seed_run.output_dir), name, seed_run)) is not None:
                done[seed, name] = result
    return done


def load_run_config(output_dir: str | Path) -> ExperimentConfig:
    """The config an earlier ``pfedla run`` recorded in ``output_dir``, rooted at ``output_dir``
    wherever it is now (for --resume)."""
    directory = Path(output_dir)
    rundir.check_state(directory, resume=True, overwrite=False)
    return rundir.resumed_config(directory, rundir.read_record(directory))


def _anchored(config: ExperimentConfig) -> ExperimentConfig:
    """``config`` with relative local data and checkpoint paths made absolute, so that a resume
    from another working directory finds the same files."""
    paths = {key: str(Path(value).resolve()) for key in ("data_dir", "checkpoint_dir")
             if (value := getattr(config, key)) and not storage.is_s3(value)
             and not Path(value).is_absolute()}
    return dataclasses.replace(config, **paths) if paths else config


def _tracker(config: ExperimentConfig, output_dir: Path, tracking_uri: str) -> Tracker:
    # A tracking server stores artifacts itself (e.g. proxied to S3); a file store keeps them beside us.
    served = tracking_uri.startswith(("http://", "https://", "databricks"))
    return Tracker(tracking_uri, config.experiment_name, None if served else output_dir / "mlartifacts")


def run_experiment(config: ExperimentConfig, progress: bool = True, track: bool = True,
                   resume: bool = False, overwrite: bool = False) -> ExperimentResult:
    """Run every algorithm of ``config`` once per seed, then write summary.json and the report.

    Each seed's outputs (partition.json, results/, models/, α) go to ``output_dir/seed_<s>/``.
    With ``resume``, finished (algorithm, seed) pairs are read back and the unfinished one
    continues from its newest good checkpoint of this run (its MLflow run continues too). A fresh
    run refuses an ``output_dir`` holding a run unless ``overwrite``, which then deletes only that
    run's files. Everything that can fail (config, device, output location, the first seed's data,
    a remote tracking server) is checked before anything in ``output_dir`` is written or deleted.
    """
    device = select_device(config.device)
    output_dir = Path(config.output_dir)
    rundir.check_writable(output_dir)
    existed = output_dir.is_dir()
    with contextlib.ExitStack() as held:
        if existed:  # a concurrent writer must be ruled out before the state is read
            held.enter_context(rundir.RunLock(output_dir))
        previous = rundir.check_state(output_dir, resume, overwrite)
        if resume and previous is not None:
            identity = previous.identity
        else:
            config, identity = _anchored(config), rundir.new_identity(config)
        seeds = run_seeds(config)
        known = [config] + ([previous.config] if previous is not None else [])
        algorithms = sorted({name for each in known for name in each.algorithms})
        all_seeds = sorted({seed for each in known for seed in run_seeds(each)})
        rundir.check_no_links(output_dir, rundir.seed_files(algorithms, all_seeds)
                              + report.report_files(algorithms, all_seeds),
                              rundir.written_folders(None if previous is None else previous.identity,
                                                     algorithms, all_seeds))
        # what a resume reads back is checked before anything is written
        done = _finished_results(config, output_dir) if resume else {}
        # The other seeds' data is built when their turn comes: one dataset in memory at a time.
        data = build_federated_data(_seed_run_config(config, output_dir, seeds[0]))
        tracking_uri = default_tracking_uri(output_dir)
        local_store = tracking_uri == f"sqlite:///{output_dir.resolve()}/mlflow.db"
        tracker = None
        if track and not local_store:  # a remote server: reachable before anything is touched
            tracker = _tracker(config, output_dir, tracking_uri)
        rundir.create(output_dir)
        if not existed:
            held.enter_context(rundir.RunLock(output_dir))
        if previous is not None and not resume:  # --overwrite: only the replaced run's own files go
            rundir.remove_outputs(output_dir, rundir.seed_files(algorithms, all_seeds)
                                  + report.report_files(algorithms, all_seeds))
            _checkpoint_store(previous.config, output_dir, previous.identity).clear()
        if track and local_store:  # the directory may have been copied or moved since (resumed or replaced)
            relocate_local_store(tracking_uri, output_dir / "mlartifacts")
        storage.write_json(output_dir / rundir.RUN_FILE, rundir.RunRecord(identity, config).to_dict(),
                           root=output_dir)
        if track and local_store:
            tracker = _tracker(config, output_dir, tracking_uri)
        parent = _open_parent(tracker, config, identity, resume) if tracker else None
        runs: dict[int, dict[str, AlgorithmResult]] = {}
        for index, seed in enumerate(seeds):
            seed_run = _seed_run_config(config, output_dir, seed)
            if index:
                data = build_federated_data(seed_run)
            if len(seeds) > 1:
                log.info("seed %d (%d of %d)", seed, index + 1, len(seeds))
            seed_folder = Path(seed_run.output_dir)
            storage.write_json(seed_folder / rundir.PARTITION_FILE, {"clients": data.class_counts()},
                               root=output_dir)
            checkpoints = _checkpoint_store(config, output_dir, f"{identity}/seed_{seed}")
            simulation = Simulation(seed_run, data, device, tracker, progress, checkpoints, parent)
            runs[seed] = {}
            for name in config.algorithms:
                runs[seed][name] = done.get((seed, name)) or simulation.run(name, identity, resume)
        summary = experiment_summary(runs, config.algorithms)
        # in the config's algorithm order (write_json would sort the keys)
        storage.write_bytes(output_dir / rundir.SUMMARY_FILE, json.dumps(summary, indent=2).encode(),
                            root=output_dir)
        written = report.write_report(output_dir)
        if tracker and parent:
            shared = [output_dir / rundir.SUMMARY_FILE, *written]
            tracker.close_parent(parent, parent_metrics(summary),
                                 [(path, _artifact_folder(path, output_dir)) for path in shared])
    return ExperimentResult(runs, summary, output_dir, tracking_uri, identity)


def _artifact_folder(path: Path, root: Path) -> str | None:
    """The MLflow artifact folder of a file in ``root``: its folder there (None: the top)."""
    folder = path.parent.relative_to(root).as_posix()
    return None if folder == "." else folder


def _seed_run_config(config: ExperimentConfig, output_dir: Path, seed: int) -> ExperimentConfig:
    """The single-seed experiment run for ``seed``, writing into its seed folder."""
    return dataclasses.replace(seed_config(config, seed), output_dir=str(rundir.seed_dir(output_dir, seed)))


def _open_parent(tracker: Tracker, config: ExperimentConfig, identity: str, resume: bool) -> str:
    """The MLflow run grouping this experiment's (algorithm, seed) runs; a resume continues it."""
    seeds = run_seeds(config)
    tags = {"pfedla.run": identity, "pfedla.role": "experiment"}
    return tracker.open_parent(f"experiment {identity}", config.flat_params(), {
        **tags, "pfedla.experiment_key": experiment_key(config), "pfedla.orchestration": "simulation",
        "pfedla.seeds": ",".join(map(str, seeds))}, resume)


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


def _checkpoint_store(config: ExperimentConfig, output_dir: Path, run: str) -> CheckpointStore:
    """The checkpoints of ``run``: a run identity (all its seeds, to clear them) or ``identity/seed_<s>``."""
    location = config.checkpoint_dir or output_dir / "checkpoints" / "rounds"
    return CheckpointStore(location, config.keep_checkpoints, run,
                           fallback=output_dir / "checkpoints" / "fallback")
