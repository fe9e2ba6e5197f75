"""FedPer: FedAvg over the body; the last ``personal_layers`` layers (the head) stay on each client."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pfedla.algorithms.base import BuildContext, ClientRule
from pfedla.algorithms.fedavg import FedAvgStrategy
from pfedla.registry import FedPerSettings


def head_layers(num_layers: int, personal_layers: int) -> range:
    """The indices of the last ``personal_layers`` layers."""
    return range(num_layers - personal_layers, num_layers)


class FedPerStrategy(FedAvgStrategy):
    """Arivazhagan et al.'s FedPer: each client trains its whole model every round but sends only
    the body, which the server averages; the head never leaves the client."""

    name = "fedper"

    def __init__(self, init_layers: Sequence[torch.Tensor], personal_layers: int):
        super().__init__(init_layers, ClientRule(head_layers(len(init_layers), personal_layers)))


def build(settings: FedPerSettings, context: BuildContext) -> FedPerStrategy:
    return FedPerStrategy(context.init_layers, settings.personal_layers)
