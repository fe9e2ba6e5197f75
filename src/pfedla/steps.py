"""The round's phases as steps over files: what each Kubeflow component calls.

Every step is a deterministic function of its inputs (config, seed, round, artifacts),
so a pipeline run reproduces ``pfedla run`` exactly on CPU and KFP caching is safe.
Artifacts are directories of safetensors and JSON files:

- shards:     ``client_<i>.safetensors`` (train/test tensors), ``data.json``, ``partition.json``
- state:      ``state.safetensors`` (the strategy's state_dict), ``history.json`` (per-round metrics)
- models:     ``client_<i>.safetensors``: the personalized start model θ̄_i of this round
- update:     ``update.safetensors``: Δ_i = θ_i' − θ̄_i with sample count and loss, or no
              tensors and a ``failed`` reason when the client's training failed
- evaluation: ``evaluation.json``, ``layer_weights.npy`` (pFedLA), ``models.safetensors``
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pfedla import storage
from pfedla.algorithms import FitInstruction, Strategy, make_strategy
from pfedla.algorithms.pfedla import PFedLAStrategy
from pfedla.client import (
    ClientFailure,
    ClientUpdate,
    LocalTrainer,
    failure_reason,
    select_device,
    update_problem,
)
from pfedla.config import ExperimentConfig, config_from_dict
from pfedla.data import ClientShard, build_federated_data
from pfedla.errors import ArtifactError
from pfedla.models import LayerLayout, build_model, initial_layers
from pfedla.simulation import (
    accuracy_metrics,
    evaluate_strategy,
    fit_client,
    participants,
    personalized_models,
    report_failures,
    round_metrics,
)

SHARD_KEYS = ("train_x", "train_y", "test_x", "test_y")
log = logging.getLogger(__name__)


def parse_config(config_json: str) -> ExperimentConfig:
    """The experiment config as passed between steps (JSON of ``ExperimentConfig.to_dict()``)."""
    return config_from_dict(json.loads(config_json))


@dataclass
class ModelContext:
    """The architecture every step rebuilds from the config and the data's shape (data.json)."""

    model: torch.nn.Module
    layout: LayerLayout
    num_clients: int

    @classmethod
    def load(cls, config: ExperimentConfig, shards_dir: str | Path) -> ModelContext:
        meta = storage.read_json(Path(shards_dir) / "data.json")
        model = build_model(config.model, tuple(meta["input_shape"]), meta["num_classes"], config.seed)
        return cls(model, LayerLayout.of(model), meta["num_clients"])


def partition(config_json: str, shards_dir: str | Path) -> dict[str, Any]:
    """Build the federated data once and store one file per client."""
    config = parse_config(config_json)
    data = build_federated_data(config)
    out = Path(shards_dir)
    for index, shard in enumerate(data.shards):
        storage.save_tensors(out / f"client_{index}.safetensors",
                             {key: getattr(shard, key) for key in SHARD_KEYS})
    meta = {"num_classes": data.num_classes, "input_shape": list(data.input_shape),
            "num_clients": data.num_clients}
    storage.write_json(out / "data.json", meta)
    storage.write_json(out / "partition.json", {"clients": data.class_counts()})
    return meta


def load_shard(shards_dir: str | Path, client_id: int) -> ClientShard:
    tensors, _ = storage.load_tensors(Path(shards_dir) / f"client_{client_id}.safetensors")
    missing = [key for key in SHARD_KEYS if key not in tensors]
    if missing:
        raise ArtifactError(f"shard of client {client_id} lacks {missing}")
    return ClientShard(*(tensors[key] for key in SHARD_KEYS))


def _strategy(config: ExperimentConfig, context: ModelContext) -> Strategy:
    return make_strategy(config.pipeline.algorithm, config, initial_layers(context.model))


def save_state(state_dir: str | Path, strategy: Strategy, round_idx: int,
               history: list[dict[str, float]]) -> None:
    out = Path(state_dir)
    storage.save_tensors(out / "state.safetensors", strategy.state_dict(),
                         {"algorithm": strategy.name, "next_round": round_idx})
    storage.write_json(out / "history.json", history)


def load_state(config: ExperimentConfig, context: ModelContext, state_dir: str | Path
               ) -> tuple[Strategy, int, list[dict[str, float]]]:
    """The strategy restored from a state directory (local path or s3:// prefix)."""
    location = f"{str(state_dir).rstrip('/')}/state.safetensors"
    tensors, meta = storage.load_tensors(location)
    if meta.get("algorithm") != config.pipeline.algorithm:
        raise ArtifactError(f"{location} holds {meta.get('algorithm')!r} state, "
                            f"but pipeline.algorithm is {config.pipeline.algorithm!r}")
    strategy = _strategy(config, context)
    strategy.load_state_dict(tensors)
    history = storage.read_json(f"{str(state_dir).rstrip('/')}/history.json")
    return strategy, int(meta.get("next_round", 0)), history


def server_init(config_json: str, shards_dir: str | Path, state_dir: str | Path) -> int:
    """A fresh server state, or the one at ``pipeline.resume_from``; returns the next round."""
    config = parse_config(config_json)
    context = ModelContext.load(config, shards_dir)
    if config.pipeline.resume_from:
        strategy, next_round, history = load_state(config, context, config.pipeline.resume_from)
        if next_round != config.pipeline.start_round:
            raise ArtifactError(f"{config.pipeline.resume_from} continues at round {next_round}, "
                                f"but pipeline.start_round is {config.pipeline.start_round}")
    else:
        strategy, next_round, history = _strategy(config, context), 0, []
    save_state(state_dir, strategy, next_round, history)
    return next_round


def server_configure(config_json: str, round_idx: int, shards_dir: str | Path, state_dir: str | Path,
                     models_dir: str | Path) -> list[int]:
    """Draw the round's clients and write each one's personalized start model."""
    config = parse_config(config_json)
    strategy, _, _ = load_state(config, ModelContext.load(config, shards_dir), state_dir)
    clients = participants(config, round_idx)
    for client, instruction in strategy.configure_fit(round_idx, clients).items():
        storage.save_tensors(
            Path(models_dir) / f"client_{client}.safetensors",
            {f"layer.{i}": t for i, t in enumerate(instruction.layers)},
            {"round": round_idx, "kept_local": sorted(instruction.kept_local)},
        )
    return clients


def _layers(tensors: dict[str, torch.Tensor], prefix: str, layout: LayerLayout, where: str
            ) -> list[torch.Tensor]:
    try:
        layers = [tensors[f"{prefix}.{i}"] for i in range(layout.num_layers)]
        layout.check(layers)
    except (KeyError, ValueError) as error:
        raise ArtifactError(f"{where} does not fit the configured model: {error}") from None
    return layers


def client_train(config_json: str, round_idx: int, client_id: int, shards_dir: str | Path,
                 models_dir: str | Path, update_dir: str | Path) -> float | None:
    """Train one client from its own personalized model on its own shard; returns its loss.

    A client whose training fails (raises, times out, cannot read its inputs) writes a
    failure record with the reason instead of an update and returns None: the round goes
    on without it, as in the simulation. Only a dying process fails the step (and is retried).
    """
    config = parse_config(config_json)
    target = Path(update_dir) / "update.safetensors"
    meta: dict[str, Any] = {"client_id": client_id, "round": round_idx, "bytes_down": 0}
    try:
        context = ModelContext.load(config, shards_dir)
        source = Path(models_dir) / f"client_{client_id}.safetensors"
        tensors, model_meta = storage.load_tensors(source)
        start = _layers(tensors, "layer", context.layout, str(source))
        device = select_device(config.device)
        kept_local = frozenset(model_meta.get("kept_local", []))
        instruction = FitInstruction([t.to(device) for t in start], kept_local)
        meta["bytes_down"] = instruction.bytes_sent()
        update = fit_client(LocalTrainer(context.model.to(device), context.layout), instruction,
                            load_shard(shards_dir, client_id).to(device), config, round_idx, client_id)
    except Exception as error:  # reported to the server step rather than failing the whole round
        meta["failed"] = failure_reason(error)
        log.warning("round %d: client %d failed: %s", round_idx, client_id, meta["failed"])
        storage.save_tensors(target, {}, meta)
        return None
    storage.save_tensors(target, {f"delta.{i}": d for i, d in enumerate(update.delta)},
                         {**meta, "num_samples": update.num_samples, "train_loss": update.train_loss})
    return update.train_loss


def _read_update(source: Path, round_idx: int, layout: LayerLayout
                 ) -> tuple[ClientUpdate | ClientFailure, float]:
    """A client's update file: its update or the failure it reported, and the bytes it was sent."""
    tensors, meta = storage.load_tensors(source)
    if meta.get("round") != round_idx:
        raise ArtifactError(f"{source} is an update for round {meta.get('round')}, not {round_idx}")
    try:
        client_id, bytes_down = int(meta["client_id"]), float(meta.get("bytes_down", 0))
        if "failed" in meta:
            return ClientFailure(client_id, str(meta["failed"])), bytes_down
        num_samples, train_loss = meta["num_samples"], float(meta["train_loss"])
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    except (KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"{source} has damaged metadata ({type(error).__name__}: {error})") from None
    delta = _layers(tensors, "delta", layout, str(source))
    return ClientUpdate(client_id, num_samples, delta, train_loss), bytes_down


def server_aggregate(config_json: str, round_idx: int, shards_dir: str | Path, state_dir: str | Path,
                     update_dirs: Sequence[str | Path], new_state_dir: str | Path) -> dict[str, float]:
    """Fold the round's collected updates into the server state.

    Failed clients and rejected (non-finite or oversized) updates are left out and counted;
    more than ``max_failed_fraction`` of them aborts the run. Every selected client must
    have delivered exactly one file.
    """
    started = time.perf_counter()
    config = parse_config(config_json)
    context = ModelContext.load(config, shards_dir)
    strategy, _, history = load_state(config, context, state_dir)
    updates, failures, bytes_down, delivered = [], [], 0.0, []
    for folder in update_dirs:
        source = Path(folder) / "update.safetensors"
        outcome, sent = _read_update(source, round_idx, context.layout)
        bytes_down += sent
        delivered.append(outcome.client_id)
        if isinstance(outcome, ClientFailure):
            failures.append(outcome)
        elif problem := update_problem(outcome, config.max_update_norm):
            failures.append(ClientFailure(outcome.client_id, problem))  # never reaches another client
        else:
            updates.append(outcome)
    selected = participants(config, round_idx)
    if sorted(delivered) != selected:
        raise ArtifactError(f"round {round_idx}: updates came from clients {sorted(delivered)}, "
                            f"but the round selected {selected}")
    report_failures(round_idx, failures, len(selected), config.max_failed_fraction)
    updates.sort(key=lambda u: u.client_id)  # the collected order is not guaranteed
    metrics = strategy.aggregate_fit(round_idx, updates, failures)
    metrics.update(round_metrics(updates, failures, bytes_down))
    metrics["server_seconds"] = time.perf_counter() - started
    history = [*history, {"round": round_idx, **metrics}]
    save_state(new_state_dir, strategy, round_idx + 1, history)
    return metrics


def evaluate(config_json: str, shards_dir: str | Path, state_dir: str | Path,
             new_state_dir: str | Path, evaluation_dir: str | Path | None = None) -> dict[str, float]:
    """Every client's personalized model on its test split; appends the result to the history.

    With ``evaluation_dir`` (the run's last evaluation) it also writes the per-client
    accuracies, α and the personalized models.
    """
    config = parse_config(config_json)
    context = ModelContext.load(config, shards_dir)
    strategy, next_round, history = load_state(config, context, state_dir)
    shards = [load_shard(shards_dir, i) for i in range(context.num_clients)]
    results = evaluate_strategy(strategy, context.model, context.layout, shards)
    metrics = accuracy_metrics(results)
    history = [*history]
    if history and history[-1].get("round") == next_round - 1:
        history[-1] = {**history[-1], **metrics}
    save_state(new_state_dir, strategy, next_round, history)
    if evaluation_dir is not None:
        out = Path(evaluation_dir)
        storage.write_json(out / "evaluation.json", {
            "algorithm": strategy.name,
            "mean_accuracy": metrics["accuracy_mean"],
            "client_accuracies": [r.accuracy for r in results],
            "rounds": next_round,
            "history": history,
        })
        if isinstance(strategy, PFedLAStrategy):
            np.save(out / "layer_weights.npy", strategy.layer_weights().numpy())
        storage.save_tensors(out / "models.safetensors",
                             personalized_models(strategy, context.layout, len(shards)),
                             {"algorithm": strategy.name, "model": config.model})
    return metrics


def record(config_json: str, shards_dir: str | Path, state_dir: str | Path, evaluation_dir: str | Path,
           tracking_uri: str | None = None) -> str:
    """Log the finished run to MLflow and register the personalized models; returns the run id."""
    from pfedla.tracking import Tracker, default_tracking_uri

    config = parse_config(config_json)
    evaluation = storage.read_json(Path(evaluation_dir) / "evaluation.json")
    uri = tracking_uri or default_tracking_uri(config.output_dir)
    tracker = Tracker(uri, config.experiment_name)
    name = config.pipeline.algorithm
    run_id = tracker.start_run(f"{name}-pipeline", config.flat_params(),
                               {"pfedla.algorithm": name, "pfedla.orchestration": "kubeflow"})
    for entry in evaluation["history"]:
        tracker.log_metrics(int(entry["round"]), {k: v for k, v in entry.items() if k != "round"})
    tracker.log_metrics(evaluation["rounds"], {"final_accuracy_mean": evaluation["mean_accuracy"]})
    weights = Path(evaluation_dir) / "layer_weights.npy"
    if weights.is_file():
        context = ModelContext.load(config, shards_dir)
        tracker.log_layer_weights(np.load(weights), context.layout.names, "final")
    tracker.log_file(Path(evaluation_dir) / "evaluation.json")
    tracker.log_file(Path(shards_dir) / "partition.json")
    tracker.log_file(Path(evaluation_dir) / "models.safetensors", "models")
    tracker.log_file(Path(state_dir) / "state.safetensors", "checkpoint")
    tracker.register_models(config.pipeline.registered_model, "models")
    tracker.end_run()
    if config.pipeline.checkpoint_to:
        target = config.pipeline.checkpoint_to.rstrip("/")
        for file in ("state.safetensors", "history.json"):
            storage.write_bytes(f"{target}/{file}", (Path(state_dir) / file).read_bytes())
    return run_id
