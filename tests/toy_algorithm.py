"""A toy algorithm, added the way a new one is: this one file plus a ``register`` call (in the test).

``toy``: FedAvg's server, but it moves the global model only ``step`` of the way toward the clients'
unweighted mean, so ``step = 1`` with equal client sizes is FedAvg and ``step = 0`` never moves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pfedla.algorithms.base import BuildContext
from pfedla.algorithms.fedavg import FedAvgStrategy
from pfedla.client import ClientFailure, ClientUpdate
from pfedla.registry import require_range


@dataclass
class ToySettings:
    step: float = 1.0

    def validate(self, section: str, model) -> None:
        require_range(self.step, f"{section}.step", 0, 1)


class ToyStrategy(FedAvgStrategy):
    def __init__(self, init_layers: Sequence[torch.Tensor], step: float):
        super().__init__(init_layers)
        self.step = step

    def aggregate_fit(self, round_idx: int, updates: Sequence[ClientUpdate],
                      failures: Sequence[ClientFailure]) -> dict[str, float]:
        for index, layer in enumerate(self.global_layers):
            if updates and layer is not None:
                layer += self.step * torch.stack([u.delta[index] for u in updates]).mean(dim=0)
        return {"toy_step": self.step}


def build(settings: ToySettings, context: BuildContext) -> ToyStrategy:
    return ToyStrategy(context.init_layers, settings.step)
