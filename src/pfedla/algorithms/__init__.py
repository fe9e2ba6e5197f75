"""Federated strategies: pfedla (with HeurpFedLA and a frozen ablation), fedavg, fedprox, local, pfedhn."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pfedla.algorithms.base import FitInstruction, Strategy
from pfedla.algorithms.fedavg import FedAvgStrategy
from pfedla.algorithms.fedprox import FedProxStrategy
from pfedla.algorithms.local import LocalStrategy
from pfedla.algorithms.pfedhn import PFedHNStrategy
from pfedla.algorithms.pfedla import PFedLAStrategy
from pfedla.config import ExperimentConfig
from pfedla.seeding import torch_generator

__all__ = ["FitInstruction", "Strategy", "make_strategy"]


def make_strategy(name: str, config: ExperimentConfig, init_layers: Sequence[torch.Tensor]) -> Strategy:
    """The named strategy, initialised from ``init_layers`` for ``config.clients`` clients."""
    if name == "fedavg":
        return FedAvgStrategy(init_layers)
    if name == "fedprox":
        return FedProxStrategy(init_layers, config.mu)
    if name == "local":
        return LocalStrategy(init_layers, config.clients)
    if name == "pfedhn":
        return PFedHNStrategy(init_layers, config.clients, lr=config.pfedhn_lr,
                              embedding_dim=config.embedding_dim, hidden_dim=config.hidden_dim,
                              generator=torch_generator(config.seed, "hypernetworks"))
    strategy = PFedLAStrategy(
        init_layers,
        config.clients,
        hn_lr=0.0 if name == "pfedla_frozen" else config.hn_lr,
        embedding_dim=config.embedding_dim,
        hidden_dim=config.hidden_dim,
        heur_k=config.heur_k,
        generator=torch_generator(config.seed, "hypernetworks"),
    )
    strategy.name = name
    return strategy
