"""The strategy interface: one method per phase of a round (configure, aggregate, personalize)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pfedla.client import ClientFailure, ClientUpdate
from pfedla.errors import ArtifactError


@dataclass
class FitInstruction:
    """The model a client starts local training from this round.

    ``kept_local`` lists layers the client already holds (its own last model), so
    they need not travel; every other layer is sent. ``proximal_mu`` > 0 adds FedProx's
    proximal term (mu/2)·‖θ − θ_start‖² to the client's loss.
    """

    layers: list[torch.Tensor]
    kept_local: frozenset[int] = field(default_factory=frozenset)
    proximal_mu: float = 0.0

    def bytes_sent(self) -> int:
        return sum(
            t.numel() * t.element_size() for i, t in enumerate(self.layers) if i not in self.kept_local
        )


class ModelStack:
    """Every client's model, one persistent [N, P_l] tensor per layer."""

    def __init__(self, init_layers: Sequence[torch.Tensor], num_clients: int):
        self.rows = [layer.detach().reshape(1, -1).repeat(num_clients, 1) for layer in init_layers]

    def client(self, client_id: int) -> list[torch.Tensor]:
        return [rows[client_id].clone() for rows in self.rows]

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{i}": rows for i, rows in enumerate(self.rows)}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        for i, rows in enumerate(self.rows):
            rows.copy_(checked_tensor(state, f"{prefix}.{i}", rows))


def checked_tensor(state: dict[str, torch.Tensor], key: str, like: torch.Tensor) -> torch.Tensor:
    """state[key], verified to have the shape and dtype of ``like``."""
    if key not in state:
        raise ArtifactError(f"state has no tensor '{key}': it was saved by another model or algorithm")
    value = state[key]
    if value.shape != like.shape or value.dtype != like.dtype:
        raise ArtifactError(
            f"state tensor '{key}' has shape {tuple(value.shape)} {value.dtype}, "
            f"expected {tuple(like.shape)} {like.dtype}"
        )
    return value.to(like.device)


class Strategy(ABC):
    """A federated algorithm, seen by the orchestration as the phases of a round."""

    name: str

    @abstractmethod
    def configure_fit(self, round_idx: int, clients: Sequence[int]) -> dict[int, FitInstruction]:
        """The starting model for each of this round's clients."""

    @abstractmethod
    def aggregate_fit(
        self,
        round_idx: int,
        updates: Sequence[ClientUpdate],
        failures: Sequence[ClientFailure],
    ) -> dict[str, float]:
        """Fold the round's updates into the server state; failed clients leave it untouched."""

    @abstractmethod
    def personalized_layers(self, client_id: int) -> list[torch.Tensor]:
        """The model client ``client_id`` is evaluated with (and would deploy)."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the server state, for checkpoints (safetensors-compatible)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict()`` output, checking names and shapes."""
