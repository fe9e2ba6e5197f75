"""Local training: every client keeps its own model; nothing is shared."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pfedla.algorithms.base import BuildContext, ClientRule, FitInstruction, Strategy
from pfedla.client import ClientFailure, ClientUpdate


class LocalStrategy(Strategy):
    """The no-communication baseline: every layer is private, so the server holds no model at all."""

    name = "local"

    def __init__(self, num_layers: int):
        self.client_rule = ClientRule(range(num_layers))
        self.num_layers = num_layers

    def configure_fit(self, round_idx: int, clients: Sequence[int]) -> dict[int, FitInstruction]:
        return {c: FitInstruction(self.personalized_layers(c)) for c in clients}

    def aggregate_fit(
        self, round_idx: int, updates: Sequence[ClientUpdate], failures: Sequence[ClientFailure]
    ) -> dict[str, float]:
        return {}

    def personalized_layers(self, client_id: int) -> list[torch.Tensor | None]:
        return [None] * self.num_layers

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass  # no server state


def build(settings: None, context: BuildContext) -> LocalStrategy:
    return LocalStrategy(context.layout.num_layers)
