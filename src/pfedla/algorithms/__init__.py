"""Federated strategies, one module each (pfedla, with HeurpFedLA and a frozen ablation, and the
baselines fedavg, fedavg_ft, fedprox, fedper, fedrep, fedbn, ditto, pfedhn, local), built by name
through :mod:`pfedla.registry`."""

from __future__ import annotations

import importlib

from torch import nn

from pfedla import registry
from pfedla.algorithms.base import BuildContext, ClientRule, ClientState, FitInstruction, Strategy
from pfedla.config import ExperimentConfig
from pfedla.models import LayerLayout, initial_layers

__all__ = ["ClientRule", "ClientState", "FitInstruction", "Strategy", "make_client_rule", "make_strategy"]


def make_strategy(name: str, config: ExperimentConfig, model: nn.Module) -> Strategy:
    """The registered strategy ``name`` for ``config.clients`` clients, each starting from ``model``'s
    weights, with ``config``'s settings section for it."""
    spec = registry.algorithm(name)
    module, _, function = spec.build.partition(":")
    build = getattr(importlib.import_module(module), function)
    context = BuildContext(initial_layers(model), LayerLayout.of(model), config.clients, config.seed)
    strategy = build(config.settings_of(name), context)
    strategy.name = name
    return strategy


def make_client_rule(name: str, config: ExperimentConfig, model: nn.Module) -> ClientRule:
    """The client's half of the named algorithm alone (what a training pod needs)."""
    if registry.algorithm(name).default_client:
        return ClientRule()
    return make_strategy(name, config, model).client_rule
