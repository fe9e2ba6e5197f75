"""The in-process round loop: every listed algorithm on the same partition, seed and clients, once
per seed of the experiment."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from pfedla import report, rundir, storage
from pfedla.algorithms import ClientState, FitInstruction, Strategy, make_strategy
from pfedla.algorithms.base import client_state_tensors, load_client_states
from pfedla.checkpoint import CheckpointStore
from pfedla.client import ClientFailure, EvalResult, LocalTrainer, ModelState, failure_reason, select_device
from pfedla.config import ExperimentConfig, experiment_key, run_seeds, seed_config
from pfedla.data import FederatedData, build_federated_data
from pfedla.models import LayerLayout, build_model, initial_buffers, initial_layers
from pfedla.progress import RoundProgress
from pfedla.results import (
    AlgorithmResult,
    ExperimentResult,
    experiment_summary,
    read_result,
    write_layer_weights,
    write_result,
    write_summary,
)
from pfedla.rounds import (
    accuracy_metrics,
    check_finite,
    close_round,
    evaluate_models,
    fit_client,
    layer_weights,
    participants,
    personalize_clients,
    personalized_models,
)
from pfedla.tracking import (
    FINAL_CLIENT_MEAN_METRIC,
    FINAL_METRIC,
    Tracker,
    artifact_root,
    default_tracking_uri,
    parent_metrics,
    relocate_local_store,
)

log = logging.getLogger(__name__)


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
            check_finite(strategy.state_dict(), "the server state", config, name, round_idx)
            check_finite(client_state_tensors(states), "a client's state", config, name, round_idx)
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
        if (weights := layer_weights(strategy)) is not None:
            result.layer_weights, result.raw_layer_weights = weights.alpha, weights.raw
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
        check_finite(personalized_models(models, self.layout), "a client's evaluated model", self.config,
                     strategy.name, rounds_done - 1)
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
        if heatmap_due and (weights := layer_weights(strategy)) is not None:
            self.tracker.log_layer_weights(weights.alpha, self.layout.names, f"round_{round_idx + 1:04d}",
                                           weights.raw)

    def fit_clients(self, strategy: Strategy, instructions: dict[int, FitInstruction],
                    states: list[ClientState], round_idx: int) -> tuple[list, list[ClientFailure]]:
        """Every selected client's update, and the clients whose training raised or timed out.

        A client whose training finished keeps its new state even if the server refuses its update
        (the state never left it); one whose training failed keeps its old state.
        """
        delivered, failures = [], []
        for client, instruction in instructions.items():
            try:
                update, states[client] = fit_client(strategy.client_rule, self.trainer, instruction,
                                                    states[client], self.shards[client].train, self.config,
                                                    round_idx, client)
                delivered.append(update)
            except Exception as error:  # one client's crash must not take the round down
                failures.append(ClientFailure(client, failure_reason(error)))
        return delivered, failures

    def run_round(self, strategy: Strategy, states: list[ClientState], round_idx: int) -> dict[str, float]:
        """Configure, train every selected client, close the round; returns the round's metrics."""
        started = time.perf_counter()
        instructions = strategy.configure_fit(round_idx, participants(self.config, round_idx))
        delivered, failed = self.fit_clients(strategy, instructions, states, round_idx)
        bytes_down = sum(i.bytes_sent() for i in instructions.values())
        metrics = close_round(strategy, self.config, round_idx, delivered, failed, bytes_down).metrics
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
        write_layer_weights(self.output_dir, result.name, result.layer_weights, result.raw_layer_weights)
        if self.tracker:
            self.tracker.log_file(model_path, "models")
            self.tracker.log_file(state_path, "checkpoint")
            self.tracker.log_metrics(self.config.rounds, {
                FINAL_METRIC: result.mean_accuracy, FINAL_CLIENT_MEAN_METRIC: result.client_mean_accuracy,
                "wall_seconds": result.wall_seconds})
            self.tracker.end_run()
        write_result(self.output_dir, result)


def _finished_results(config: ExperimentConfig, output_dir: Path) -> dict[tuple[int, str], AlgorithmResult]:
    """Every finished (seed, algorithm) of ``config``'s run in ``output_dir``, read back and checked."""
    done = {}
    for seed in run_seeds(config):
        seed_run = _seed_run_config(config, output_dir, seed)
        for name in config.algorithms:
            if (result := read_result(Path(seed_run.output_dir), name, seed_run)) is not None:
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
    return Tracker(tracking_uri, config.experiment_name, artifact_root(tracking_uri, output_dir))


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
        summary_path = write_summary(output_dir, summary)
        written = report.write_report(output_dir)
        if tracker and parent:
            shared = [summary_path, *written]
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


def _checkpoint_store(config: ExperimentConfig, output_dir: Path, run: str) -> CheckpointStore:
    """The checkpoints of ``run``: a run identity (all its seeds, to clear them) or ``identity/seed_<s>``."""
    location = config.checkpoint_dir or output_dir / "checkpoints" / "rounds"
    return CheckpointStore(location, config.keep_checkpoints, run,
                           fallback=output_dir / "checkpoints" / "fallback")
