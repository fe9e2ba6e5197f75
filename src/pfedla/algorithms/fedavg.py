"""FedAvg: one global model, the sample-weighted mean of the clients' trained models."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pfedla.algorithms.base import FitInstruction, Strategy, checked_tensor
from pfedla.client import ClientFailure, ClientUpdate


class FedAvgStrategy(Strategy):
    """McMahan et al.'s federated averaging; every client is evaluated with the global model."""

    name = "fedavg"

    def __init__(self, init_layers: Sequence[torch.Tensor]):
        self.global_layers = [layer.detach().clone() for layer in init_layers]

    def configure_fit(self, round_idx: int, clients: Sequence[int]) -> dict[int, FitInstruction]:
        return {c: FitInstruction([t.clone() for t in self.global_layers]) for c in clients}

    def aggregate_fit(
        self, round_idx: int, updates: Sequence[ClientUpdate], failures: Sequence[ClientFailure]
    ) -> dict[str, float]:
        if not updates:
            return {}
        weights = torch.tensor([float(u.num_samples) for u in updates])
        weights = (weights / weights.sum()).to(self.global_layers[0].device)
        for index, layer in enumerate(self.global_layers):
            deltas = torch.stack([u.delta[index] for u in updates])
            layer += weights @ deltas
        return {}

    def personalized_layers(self, client_id: int) -> list[torch.Tensor]:
        return [t.clone() for t in self.global_layers]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"global.{i}": t for i, t in enumerate(self.global_layers)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, layer in enumerate(self.global_layers):
            layer.copy_(checked_tensor(state, f"global.{i}", layer))
