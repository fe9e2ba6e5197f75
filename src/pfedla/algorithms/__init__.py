"""Federated strategies: pfedla (with HeurpFedLA and a frozen ablation) and the baselines fedavg,
fedavg_ft, fedprox, fedper, fedrep, fedbn, ditto, pfedhn and local."""

from __future__ import annotations

from torch import nn

from pfedla.algorithms.base import ClientRule, ClientState, FitInstruction, Strategy
from pfedla.algorithms.ditto import DittoStrategy
from pfedla.algorithms.fedavg import FedAvgStrategy
from pfedla.algorithms.fedavg_ft import FedAvgFTStrategy
from pfedla.algorithms.fedbn import FedBNStrategy
from pfedla.algorithms.fedper import FedPerStrategy
from pfedla.algorithms.fedprox import FedProxStrategy
from pfedla.algorithms.fedrep import FedRepStrategy
from pfedla.algorithms.local import LocalStrategy
from pfedla.algorithms.pfedhn import PFedHNStrategy
from pfedla.algorithms.pfedla import PFedLAStrategy
from pfedla.config import ExperimentConfig
from pfedla.models import LayerLayout, initial_layers
from pfedla.seeding import torch_generator

__all__ = ["ClientRule", "ClientState", "FitInstruction", "Strategy", "make_client_rule", "make_strategy"]


def make_strategy(name: str, config: ExperimentConfig, model: nn.Module) -> Strategy:
    """The named strategy for ``config.clients`` clients, every one starting from ``model``'s weights."""
    init_layers = initial_layers(model)
    if name == "fedavg":
        return FedAvgStrategy(init_layers)
    if name == "fedavg_ft":
        return FedAvgFTStrategy(init_layers, config.finetune_epochs)
    if name == "fedprox":
        return FedProxStrategy(init_layers, config.mu)
    if name == "fedper":
        return FedPerStrategy(init_layers, config.personal_layers)
    if name == "fedrep":
        return FedRepStrategy(init_layers, config.personal_layers, config.head_epochs)
    if name == "fedbn":
        return FedBNStrategy(init_layers, LayerLayout.of(model).norm_layers)
    if name == "ditto":
        return DittoStrategy(init_layers, config.ditto_lambda)
    if name == "local":
        return LocalStrategy(len(init_layers))
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


# Algorithms whose clients follow the default rule: their client pods need not build server state.
_DEFAULT_CLIENT = ("pfedla", "pfedla_frozen", "pfedhn")


def make_client_rule(name: str, config: ExperimentConfig, model: nn.Module) -> ClientRule:
    """The client's half of the named algorithm alone (what a training pod needs)."""
    if name in _DEFAULT_CLIENT:
        return ClientRule()
    return make_strategy(name, config, model).client_rule
