"""Shared helpers of the issue-20 research scripts: one simulation per (config, overrides), an
algorithm run round by round with every client's accuracy after every round, and prototype
pFedLA variants made from keyword settings.

Every script in this folder prints its own table; run them from the worktree root with
    nice python benchmarks/issue20/<script>.py --data-dir ../shared/data/mnist ...
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from pfedla.algorithms import make_strategy  # noqa: E402
from pfedla.algorithms.pfedla import PFedLAStrategy  # noqa: E402
from pfedla.config import load_config  # noqa: E402
from pfedla.data.federated import build_federated_data  # noqa: E402
from pfedla.models import initial_layers  # noqa: E402
from pfedla.seeding import torch_generator  # noqa: E402
from pfedla.simulation import Simulation, accuracy_metrics, participants  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
DATA = str(ROOT.parent.parent / "shared" / "data" / "mnist")
CONFIG = ROOT / "configs" / "mnist-comparison.yaml"
SPLITS = {
    "iid": ["partition.kind=iid"],
    "dir0.5": ["partition.kind=dirichlet", "partition.alpha=0.5"],
    "dir0.1": ["partition.kind=dirichlet", "partition.alpha=0.1"],
    "path2": ["partition.kind=pathological", "partition.classes_per_client=2"],
}


def simulation(overrides: list[str], config_path: Path | None = CONFIG, data_dir: str = DATA) -> Simulation:
    config = load_config(config_path, [f"data_dir={data_dir}", "device=cpu", *overrides])
    return Simulation(config, build_federated_data(config), torch.device("cpu"), tracker=None, progress=False)


def pfedla_variant(sim: Simulation, **settings) -> PFedLAStrategy:
    """A pFedLA strategy with prototype settings (keyword arguments of PFedLAStrategy)."""
    config = sim.config
    strategy = PFedLAStrategy(initial_layers(sim.model), config.clients,
                              hn_lr=settings.pop("hn_lr", config.hn_lr),
                              embedding_dim=settings.pop("embedding_dim", config.embedding_dim),
                              hidden_dim=settings.pop("hidden_dim", config.hidden_dim),
                              heur_k=settings.pop("heur_k", config.heur_k),
                              generator=torch_generator(config.seed, "hypernetworks"), **settings)
    return strategy


def start(sim: Simulation, name: str, **settings):
    """(strategy, client states) for a registered algorithm or a pFedLA variant ("pfedla:..." names
    get ``settings``)."""
    if name.startswith("pfedla") and (settings or name == "pfedla_paper"):
        strategy = pfedla_variant(sim, **settings)
    else:
        strategy = make_strategy(name, sim.config, sim.model)
    rule = strategy.client_rule
    return strategy, [rule.initial_state(sim.init_model) for _ in range(sim.config.clients)]


def run(sim: Simulation, name: str, every_round: bool = False,
        after_round: Callable | None = None, **settings) -> dict:
    """All rounds; final accuracies, and with ``every_round`` each client's accuracy per round."""
    sequential = settings.pop("sequential", False)
    set_last_batch(settings.pop("last_batch", "mean"))
    holdout = settings.pop("holdout", 0.0)  # share of each train split held out for α's signal
    signal = settings.pop("signal", "val" if holdout else None)  # "val" or "train": ∇loss at θ̄_i drives α
    strategy, states = start(sim, name, **settings)
    started, per_round = time.perf_counter(), []
    kept_shards = sim.shards
    if holdout:
        sim.shards, held = split_holdout(sim.shards, holdout, sim.config.seed)
    for round_idx in range(sim.config.rounds):
        if signal:
            clients = participants(sim.config, round_idx)
            instructions = strategy.configure_fit(round_idx, clients)
            updates, failures = sim.train_round_clients(strategy.client_rule, instructions, states, round_idx)
            source = held if signal == "val" else [shard.train for shard in sim.shards]
            strategy.signal = {u.client_id: [-g for g in loss_gradient(sim, instructions[u.client_id].layers,
                                                                       *source[u.client_id])] for u in updates}
            strategy.aggregate_fit(round_idx, updates, failures)
        elif sequential:  # the public code's schedule: clients one after another, each sees the earlier ones
            for client in participants(sim.config, round_idx):
                instructions = strategy.configure_fit(round_idx, [client])
                updates, failures = sim.train_round_clients(strategy.client_rule, instructions, states, round_idx)
                strategy.aggregate_fit(round_idx, updates, failures)
        else:
            sim.run_round(strategy, states, round_idx)
        if after_round is not None:
            after_round(sim, strategy, states, round_idx)
        if every_round and round_idx < sim.config.rounds - 1:
            per_round.append([r.accuracy for r in sim.evaluate(strategy, states, round_idx + 1)[1]])
    evaluation = sim.evaluate(strategy, states, sim.config.rounds)[1]
    sim.shards = kept_shards
    per_round.append([r.accuracy for r in evaluation])
    metrics = accuracy_metrics(evaluation)
    return {"accuracy": metrics["accuracy_mean"], "client_mean": metrics["accuracy_client_mean"],
            "seconds": time.perf_counter() - started, "clients": per_round[-1],
            "per_round": per_round if every_round else None, "strategy": strategy, "states": states}


def set_last_batch(rule: str) -> None:
    """Prototype: every client's training in this process weighs a short last batch by ``rule``."""
    import dataclasses

    from pfedla import simulation as simulation_module

    original = getattr(simulation_module, "_original_train_settings", simulation_module.train_settings)
    simulation_module._original_train_settings = original
    simulation_module.train_settings = lambda config, mu=0.0: dataclasses.replace(original(config, mu),
                                                                                  last_batch=rule)


def split_holdout(shards, share: float, seed: int):
    """Each shard's train split cut into (train, held-out) by a seeded permutation."""
    from pfedla.data.federated import ClientShard

    generator = torch.Generator().manual_seed(seed + 1234)
    kept, held = [], []
    for shard in shards:
        order = torch.randperm(shard.num_train, generator=generator)
        cut = max(1, round(share * shard.num_train))
        val, train = order[:cut], order[cut:]
        kept.append(ClientShard(shard.train_x[train], shard.train_y[train], shard.test_x, shard.test_y))
        held.append((shard.train_x[val], shard.train_y[val]))
    return kept, held


def loss_gradient(sim, layers, x, y):
    """∇ of the mean cross-entropy on (x, y) at the model ``layers``: one tensor per layer."""
    from torch import nn
    from torch.func import functional_call

    leaves = [t.detach().clone().requires_grad_(True) for t in layers]
    logits = functional_call(sim.trainer.model, sim.layout.unflatten(leaves), (x,))
    loss = nn.functional.cross_entropy(logits, y)
    return [g.detach() for g in torch.autograd.grad(loss, leaves)]


# The paper's method as the public code runs it (with the descent sign): ReLU heads, plain SGD on
# the unscaled surrogate, embedding 100 -> 3 x (Linear 100 + ReLU) -> heads U(0,1) / bias 0,
# clients one after another. hn_lr has to be given (the public 5e-3 never moves α here).
PAPER = {"heads": "relu", "step": "plain", "shape": "paper", "embedding_dim": 100, "hidden_dim": 100,
         "sequential": True}


def parse_variant(spec: str) -> tuple[str, str, dict]:
    """``label=algorithm:key=value,key=value`` (label and settings optional) -> (label, algorithm,
    settings); values are YAML (numbers, true/false, [lists])."""
    import yaml

    label, _, rest = spec.partition("=") if "=" in spec.split(":")[0] else (spec, "", spec)
    algorithm, _, text = rest.partition(":")
    settings = dict(PAPER) if algorithm == "pfedla_paper" else {}
    for item in filter(None, _split_top(text)):
        key, _, value = item.partition("=")
        settings[key] = yaml.safe_load(value)
    return label, algorithm, settings


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def worst_drop(per_round: list[list[float]]) -> tuple[float, int, int]:
    """The largest one-round fall of any client's accuracy: (points, round (1-based), client)."""
    worst = (0.0, 0, -1)
    for r in range(1, len(per_round)):
        for c, (before, after) in enumerate(zip(per_round[r - 1], per_round[r], strict=True)):
            if 100 * (before - after) > worst[0]:
                worst = (100 * (before - after), r + 1, c)
    return worst


def fmean(values) -> float:
    return statistics.fmean(values)


def dump(path: str | None, payload) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=1, default=float))
