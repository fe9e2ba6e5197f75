"""Local training: every client keeps its own model; nothing is shared."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pfedla.algorithms.base import FitInstruction, ModelStack, Strategy
from pfedla.client import ClientFailure, ClientUpdate


class LocalStrategy(Strategy):
    """The no-communication baseline."""

    name = "local"

    def __init__(self, init_layers: Sequence[torch.Tensor], num_clients: int):
        self.models = ModelStack(init_layers, num_clients)

    def configure_fit(self, round_idx: int, clients: Sequence[int]) -> dict[int, FitInstruction]:
        everything = frozenset(range(len(self.models.rows)))
        return {c: FitInstruction(self.models.client(c), kept_local=everything) for c in clients}

    def aggregate_fit(
        self, round_idx: int, updates: Sequence[ClientUpdate], failures: Sequence[ClientFailure]
    ) -> dict[str, float]:
        for update in updates:
            for rows, delta in zip(self.models.rows, update.delta, strict=True):
                rows[update.client_id] += delta
        return {}

    def personalized_layers(self, client_id: int) -> list[torch.Tensor]:
        return self.models.client(client_id)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.models.state_dict("models")

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.models.load_state_dict(state, "models")
