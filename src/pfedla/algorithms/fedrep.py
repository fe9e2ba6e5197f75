"""FedRep: the head is trained first with the body frozen, then the body; only the body is shared."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from pfedla.algorithms.base import BuildContext, ClientRule, ClientState, FitInstruction, Generators
from pfedla.algorithms.fedavg import FedAvgStrategy
from pfedla.algorithms.fedper import head_layers
from pfedla.client import LocalTrainer, ModelState, TrainSettings
from pfedla.registry import FedRepSettings


class FedRepClient(ClientRule):
    """Collins et al.'s client: ``head_epochs`` on the private head with the received body fixed,
    then ``settings.epochs`` on the body with the new head fixed. One batch-order stream runs
    through both phases."""

    def __init__(self, head: range, head_epochs: int):
        super().__init__(head)
        self.head_epochs = head_epochs

    def fit(self, trainer: LocalTrainer, instruction: FitInstruction, state: ClientState,
            train: tuple[torch.Tensor, torch.Tensor], settings: TrainSettings, generators: Generators
            ) -> tuple[ModelState, float, ClientState]:
        start = self.start_model(instruction.layers, state)
        body = frozenset(range(len(start.layers))) - self.private
        generator = generators("train")
        with_head, _ = trainer.train(start, *train, dataclasses.replace(settings, epochs=self.head_epochs),
                                     generator, trainable=self.private)
        trained, loss = trainer.train(with_head, *train, settings, generator, trainable=body)
        return trained, loss, self.keep(trained, state)


class FedRepStrategy(FedAvgStrategy):
    """FedAvg over the body (representation); each client's head stays with it."""

    name = "fedrep"

    def __init__(self, init_layers: Sequence[torch.Tensor], personal_layers: int, head_epochs: int):
        head = head_layers(len(init_layers), personal_layers)
        super().__init__(init_layers, FedRepClient(head, head_epochs))


def build(settings: FedRepSettings, context: BuildContext) -> FedRepStrategy:
    return FedRepStrategy(context.init_layers, settings.personal_layers, settings.head_epochs)
