"""FedBN: FedAvg over everything but the normalization layers, which stay on each client."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pfedla.algorithms.base import BuildContext, ClientRule
from pfedla.algorithms.fedavg import FedAvgStrategy


class FedBNStrategy(FedAvgStrategy):
    """Li et al.'s FedBN: a client's BatchNorm affine parameters (and, as for every algorithm here,
    its running statistics) are private; all other layers are averaged as in FedAvg."""

    name = "fedbn"

    def __init__(self, init_layers: Sequence[torch.Tensor], norm_layers: frozenset[int]):
        super().__init__(init_layers, ClientRule(norm_layers))


def build(settings: None, context: BuildContext) -> FedBNStrategy:
    return FedBNStrategy(context.init_layers, context.layout.norm_layers)
