"""FedAvg: one global model, the sample-weighted mean of the clients' trained models."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pfedla.algorithms.base import BuildContext, ClientRule, FitInstruction, Strategy, checked_tensor
from pfedla.client import ClientFailure, ClientUpdate


class FedAvgStrategy(Strategy):
    """McMahan et al.'s federated averaging; every client is evaluated with the global model.

    With a ``client_rule`` that keeps private layers (FedPer, FedRep, FedBN) the server holds,
    sends and averages only the shared layers: the private ones never exist on the server.
    """

    name = "fedavg"

    def __init__(self, init_layers: Sequence[torch.Tensor], client_rule: ClientRule | None = None):
        self.client_rule = client_rule or ClientRule()
        private = self.client_rule.private
        self.global_layers = [None if i in private else layer.detach().clone()
                              for i, layer in enumerate(init_layers)]

    def configure_fit(self, round_idx: int, clients: Sequence[int]) -> dict[int, FitInstruction]:
        return {c: FitInstruction(self.personalized_layers(c)) for c in clients}

    def aggregate_fit(
        self, round_idx: int, updates: Sequence[ClientUpdate], failures: Sequence[ClientFailure]
    ) -> dict[str, float]:
        if not updates:
            return {}
        weights = torch.tensor([float(u.num_samples) for u in updates])
        for index, layer in enumerate(self.global_layers):
            if layer is not None:
                deltas = torch.stack([u.delta[index] for u in updates])
                layer += (weights / weights.sum()).to(layer.device) @ deltas
        return {}

    def personalized_layers(self, client_id: int) -> list[torch.Tensor | None]:
        return [None if t is None else t.clone() for t in self.global_layers]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"global.{i}": t for i, t in enumerate(self.global_layers) if t is not None}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, layer in enumerate(self.global_layers):
            if layer is not None:
                layer.copy_(checked_tensor(state, f"global.{i}", layer))


def build(settings: None, context: BuildContext) -> FedAvgStrategy:
    return FedAvgStrategy(context.init_layers)
