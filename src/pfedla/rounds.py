"""One round's phases, the same for every orchestration: participants, fit, screen, failures,
aggregate, metrics, personalize, evaluate.

The in-process simulation (:mod:`pfedla.simulation`) calls them in a loop; the pipeline steps
(:mod:`pfedla.steps`) call the same functions from separate pods, with the data plane between
them. Each phase is a deterministic function of the config, the round and the client, which is
why both orchestrations give the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pfedla.algorithms import ClientRule, ClientState, FitInstruction, Strategy
from pfedla.algorithms.base import Generators
from pfedla.algorithms.pfedla import PFedLAStrategy
from pfedla.client import (
    ClientFailure,
    ClientUpdate,
    EvalResult,
    LocalTrainer,
    ModelState,
    TrainSettings,
    evaluate_client,
    screen_updates,
)
from pfedla.config import ExperimentConfig
from pfedla.errors import PfedlaError
from pfedla.models import LayerLayout
from pfedla.results import LayerWeights, client_mean
from pfedla.seeding import numpy_rng, torch_generator

log = logging.getLogger(__name__)


# -- participants and fit ----------------------------------------------------------------------------------

def participants(config: ExperimentConfig, round_idx: int) -> list[int]:
    """The round's clients: a seeded draw, identical for every algorithm and orchestration."""
    count = max(1, round(config.participation * config.clients))
    if count >= config.clients:
        return list(range(config.clients))
    rng = numpy_rng(config.seed, "participants", round_idx)
    return sorted(int(c) for c in rng.choice(config.clients, size=count, replace=False))


def train_settings(config: ExperimentConfig, proximal_mu: float = 0.0) -> TrainSettings:
    return TrainSettings(epochs=config.local_epochs, batch_size=config.batch_size, lr=config.lr,
                         timeout=config.client_timeout, proximal_mu=proximal_mu, last_batch=config.last_batch)


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


# -- screen, failures, aggregate, metrics ------------------------------------------------------------------

class RunAborted(PfedlaError):
    """Too many clients failed in one round to trust its aggregate, or the run diverged."""


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


@dataclass
class RoundResult:
    """What the server made of a round: its metrics, and the clients it left out and why."""

    metrics: dict[str, float]
    failures: list[ClientFailure]


def close_round(strategy: Strategy, config: ExperimentConfig, round_idx: int,
                delivered: Sequence[ClientUpdate], failed: Sequence[ClientFailure], bytes_down: float
                ) -> RoundResult:
    """The server's half of a round: screen the delivered updates (non-finite or oversized ones are
    left out), report every left-out client (aborting past ``max_failed_fraction``), aggregate the
    rest and measure the round. A failed client leaves the server state untouched."""
    updates, refused = screen_updates(list(delivered), config.max_update_norm, config.update_norm_ratio)
    failures = sorted([*failed, *refused], key=lambda f: f.client_id)
    report_failures(round_idx, failures, len(delivered) + len(failed), config.max_failed_fraction)
    metrics = strategy.aggregate_fit(round_idx, updates, failures)
    metrics.update(round_metrics(updates, failures, bytes_down))
    return RoundResult(metrics, failures)


def check_finite(tensors: Mapping[str, torch.Tensor], what: str, config: ExperimentConfig, algorithm: str,
                 round_idx: int) -> None:
    """Stop a diverged run: a NaN or Inf in ``what`` (the server state, the client states, the evaluated
    models) would otherwise evaluate as accuracy 0 and end with success. Called before the round is
    checkpointed, so a resume never continues a diverged state."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise RunAborted(f"{algorithm}, seed {config.seed}, round {round_idx}: {what} became non-finite "
                             f"(NaN or Inf), first at {name}: the run diverged; lower lr or the algorithm's "
                             "own step sizes (e.g. pfedla.hn_lr, ditto.lam)")


# -- personalize and evaluate ------------------------------------------------------------------------------

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


def personalized_models(models: Sequence[ModelState], layout: LayerLayout) -> dict[str, torch.Tensor]:
    """Every client's evaluated model as named tensors ``client<i>.<parameter or buffer>``."""
    return {
        f"client{i}.{name}": tensor
        for i, state in enumerate(models)
        for name, tensor in {**layout.unflatten(state.layers), **state.buffers}.items()
    }


def layer_weights(strategy: Strategy) -> LayerWeights | None:
    """The strategy's current α, or None for an algorithm without one."""
    if not isinstance(strategy, PFedLAStrategy):
        return None
    raw = strategy.raw_layer_weights()
    return LayerWeights(strategy.layer_weights().cpu().numpy(), None if raw is None else raw.cpu().numpy())
