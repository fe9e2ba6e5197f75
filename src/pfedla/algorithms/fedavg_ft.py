"""FedAvg + fine-tuning: each client fine-tunes the global model on its own data before evaluation."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from pfedla.algorithms.base import BuildContext, ClientRule, ClientState, Generators
from pfedla.algorithms.fedavg import FedAvgStrategy
from pfedla.client import LocalTrainer, ModelState, TrainSettings
from pfedla.registry import FineTuneSettings


class FineTuneClient(ClientRule):
    """Trains like FedAvg's client; its evaluated model is the global model after ``epochs``
    epochs of local SGD (no proximal term, no deadline), which it does not keep."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    @property
    def personalizes_with_data(self) -> bool:
        return self.epochs > 0

    def personalize(self, trainer: LocalTrainer, layers: Sequence[torch.Tensor | None], state: ClientState,
                    train: tuple[torch.Tensor, torch.Tensor], settings: TrainSettings,
                    generators: Generators) -> ModelState:
        start = self.start_model(layers, state)
        if self.epochs == 0:
            return start
        tuning = dataclasses.replace(settings, epochs=self.epochs, proximal_mu=0.0, timeout=None)
        tuned, _ = trainer.train(start, *train, tuning, generators("finetune"))
        return tuned


class FedAvgFTStrategy(FedAvgStrategy):
    """The strong simple baseline of the pFL literature: FedAvg, then local fine-tuning."""

    name = "fedavg_ft"

    def __init__(self, init_layers: Sequence[torch.Tensor], finetune_epochs: int):
        super().__init__(init_layers, FineTuneClient(finetune_epochs))


def build(settings: FineTuneSettings, context: BuildContext) -> FedAvgFTStrategy:
    return FedAvgFTStrategy(context.init_layers, settings.finetune_epochs)
