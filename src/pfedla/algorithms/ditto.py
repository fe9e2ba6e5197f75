"""Ditto: FedAvg for a global model, and on each client a personal model pulled toward it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from pfedla.algorithms.base import BuildContext, ClientRule, ClientState, FitInstruction, Generators
from pfedla.algorithms.fedavg import FedAvgStrategy
from pfedla.client import LocalTrainer, ModelState, TrainSettings
from pfedla.registry import DittoSettings


class DittoClient(ClientRule):
    """Li et al.'s client: each round it trains its personal model v on F(v) + (λ/2)·‖v − w‖²,
    w being the received global model, and trains w as in FedAvg. v never leaves the client and
    is what it is evaluated with. With λ = 0, v trains exactly like ``local``'s model (same
    start, same batch order)."""

    def __init__(self, lam: float):
        super().__init__()
        self.lam = lam

    def initial_state(self, init: ModelState) -> ClientState:
        return dataclasses.replace(super().initial_state(init), personal=init.clone())

    def fit(self, trainer: LocalTrainer, instruction: FitInstruction, state: ClientState,
            train: tuple[torch.Tensor, torch.Tensor], settings: TrainSettings, generators: Generators
            ) -> tuple[ModelState, float, ClientState]:
        assert state.personal is not None
        received = self.start_model(instruction.layers, state)
        pulled = dataclasses.replace(settings, proximal_mu=self.lam)
        personal, _ = trainer.train(state.personal, *train, pulled, generators("train"),
                                    anchor=received.layers)
        trained, loss = trainer.train(received, *train, settings, generators("global"))
        return trained, loss, dataclasses.replace(self.keep(trained, state), personal=personal)

    def personalize(self, trainer: LocalTrainer, layers: Sequence[torch.Tensor | None], state: ClientState,
                    train: tuple[torch.Tensor, torch.Tensor], settings: TrainSettings,
                    generators: Generators) -> ModelState:
        assert state.personal is not None
        return state.personal.clone()


class DittoStrategy(FedAvgStrategy):
    """The server is FedAvg's; everything personal happens on the clients."""

    name = "ditto"

    def __init__(self, init_layers: Sequence[torch.Tensor], lam: float):
        super().__init__(init_layers, DittoClient(lam))


def build(settings: DittoSettings, context: BuildContext) -> DittoStrategy:
    return DittoStrategy(context.init_layers, settings.lam)
