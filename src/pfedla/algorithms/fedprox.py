"""FedProx: FedAvg whose clients train with a proximal term pulling them toward the global model."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pfedla.algorithms.base import BuildContext, FitInstruction
from pfedla.algorithms.fedavg import FedAvgStrategy
from pfedla.registry import FedProxSettings


class FedProxStrategy(FedAvgStrategy):
    """Li et al.'s FedProx: the server is FedAvg's; each client minimizes its loss plus
    (mu/2)·‖θ − θ_global‖², which bounds how far heterogeneous clients drift in a round."""

    name = "fedprox"

    def __init__(self, init_layers: Sequence[torch.Tensor], mu: float):
        super().__init__(init_layers)
        self.mu = mu

    def configure_fit(self, round_idx: int, clients: Sequence[int]) -> dict[int, FitInstruction]:
        return {c: FitInstruction(i.layers, i.kept_local, proximal_mu=self.mu)
                for c, i in super().configure_fit(round_idx, clients).items()}


def build(settings: FedProxSettings, context: BuildContext) -> FedProxStrategy:
    return FedProxStrategy(context.init_layers, settings.mu)
