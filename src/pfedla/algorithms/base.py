"""The strategy interface: the server's phases of a round (configure, aggregate, personalize) and
the client's half of an algorithm (how it trains, what it keeps, which model it is judged by)."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from pfedla.client import ClientFailure, ClientUpdate, LocalTrainer, ModelState, TrainSettings
from pfedla.errors import ArtifactError
from pfedla.models import LayerLayout
from pfedla.seeding import torch_generator


@dataclass(frozen=True)
class BuildContext:
    """What every strategy is built from, besides its settings: the shared initial model (its layers
    and layout), the number of clients and the experiment's seed (for the server's own draws)."""

    init_layers: list[torch.Tensor]
    layout: LayerLayout
    num_clients: int
    seed: int

    def generator(self, purpose: str) -> torch.Generator:
        """The server's random stream for ``purpose``, a pure function of the seed."""
        return torch_generator(self.seed, purpose)


@dataclass
class FitInstruction:
    """The model a client starts local training from this round.

    A ``None`` layer is one of the client's private layers: the server neither has nor sends
    it. ``kept_local`` lists layers the client already holds (its own last model, which the
    server also keeps), so they need not travel either; every other layer is sent.
    ``proximal_mu`` > 0 adds FedProx's proximal term (mu/2)·‖θ − θ_start‖² to the client's loss.
    """

    layers: list[torch.Tensor | None]
    kept_local: frozenset[int] = field(default_factory=frozenset)
    proximal_mu: float = 0.0

    def bytes_sent(self) -> int:
        return sum(t.numel() * t.element_size() for i, t in enumerate(self.layers)
                   if t is not None and i not in self.kept_local)


@dataclass
class ClientState:
    """What one client keeps between rounds and never sends: its private layers, its buffers
    (normalization running statistics) and, for Ditto, its personal model."""

    layers: dict[int, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    personal: ModelState | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat names for safetensors: ``layer.<i>``, ``buffer.<name>``, ``personal.<i>``,
        ``personal_buffer.<name>``."""
        flat = {f"layer.{i}": t for i, t in self.layers.items()}
        flat.update({f"buffer.{name}": t for name, t in self.buffers.items()})
        if self.personal is not None:
            flat.update({f"personal.{i}": t for i, t in enumerate(self.personal.layers)})
            flat.update({f"personal_buffer.{name}": t for name, t in self.personal.buffers.items()})
        return flat

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], like: ClientState) -> ClientState:
        """Rebuild a state shaped like ``like`` (a client's initial state), checking every tensor."""
        def pick(key: str, reference: torch.Tensor) -> torch.Tensor:
            return checked_tensor(tensors, key, reference)

        personal = None
        if like.personal is not None:
            personal = ModelState([pick(f"personal.{i}", t) for i, t in enumerate(like.personal.layers)],
                                  {n: pick(f"personal_buffer.{n}", t)
                                   for n, t in like.personal.buffers.items()})
        return cls({i: pick(f"layer.{i}", t) for i, t in like.layers.items()},
                   {n: pick(f"buffer.{n}", t) for n, t in like.buffers.items()}, personal)


CLIENT_PREFIX = "client."


def client_state_tensors(states: Sequence[ClientState]) -> dict[str, torch.Tensor]:
    """Every client's state as named tensors ``client.<i>.<name>`` (beside the server state in a
    simulation checkpoint: the simulation plays every client too)."""
    return {f"{CLIENT_PREFIX}{i}.{name}": t
            for i, state in enumerate(states) for name, t in state.tensors().items()}


def load_client_states(tensors: dict[str, torch.Tensor], initial: Sequence[ClientState]) -> list[ClientState]:
    """``client_state_tensors`` output back as states shaped like ``initial``."""
    by_client: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith(CLIENT_PREFIX):
            client, _, name = key[len(CLIENT_PREFIX):].partition(".")
            by_client.setdefault(client, {})[name] = tensor
    return [ClientState.from_tensors(by_client.get(str(i), {}), like) for i, like in enumerate(initial)]


# The generator for one named stream of the client's randomness this round (batch order).
Generators = Callable[[str], torch.Generator]


class ClientRule:
    """The client's half of an algorithm. This default trains every layer from the start model
    for ``settings.epochs`` and is evaluated with the server's personalized model; subclasses
    keep ``private`` layers to themselves, train in phases or keep a personal model."""

    def __init__(self, private: Iterable[int] = ()):
        self.private = frozenset(private)  # layers that never leave the client

    def initial_state(self, init: ModelState) -> ClientState:
        """The state every client starts with, derived from the shared initial model."""
        return ClientState({i: init.layers[i].clone() for i in self.private},
                           {name: b.clone() for name, b in init.buffers.items()})

    def start_model(self, layers: Sequence[torch.Tensor | None], state: ClientState) -> ModelState:
        """The server's layers with the client's private layers and buffers filled in. The tensors
        are shared, not copied (the trainer copies them into its own; nothing writes to them)."""
        return ModelState([state.layers[i] if layer is None else layer for i, layer in enumerate(layers)],
                          dict(state.buffers))

    def fit(self, trainer: LocalTrainer, instruction: FitInstruction, state: ClientState,
            train: tuple[torch.Tensor, torch.Tensor], settings: TrainSettings, generators: Generators
            ) -> tuple[ModelState, float, ClientState]:
        """Local training this round: (the model whose shared layers are sent back, the mean loss,
        the client's new state)."""
        trained, loss = trainer.train(self.start_model(instruction.layers, state), *train, settings,
                                      generators("train"))
        return trained, loss, self.keep(trained, state)

    def keep(self, trained: ModelState, state: ClientState) -> ClientState:
        """The new state after training: the private layers and buffers of ``trained``."""
        return dataclasses.replace(state, layers={i: trained.layers[i] for i in self.private},
                                   buffers=trained.buffers)

    @property
    def personalizes_with_data(self) -> bool:
        """Whether ``personalize`` trains on the client's data (then it needs its train split)."""
        return False

    def personalize(self, trainer: LocalTrainer, layers: Sequence[torch.Tensor | None], state: ClientState,
                    train: tuple[torch.Tensor, torch.Tensor], settings: TrainSettings,
                    generators: Generators) -> ModelState:
        """The model this client is evaluated with (and would deploy), from the server's
        personalized ``layers`` and its own state."""
        return self.start_model(layers, state)


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


def stacked_deltas(updates: Sequence[ClientUpdate], num_layers: int) -> list[torch.Tensor]:
    """The round's updates as one [S, P_l] tensor per layer (row s: updates[s])."""
    return [torch.stack([u.delta[layer] for u in updates]) for layer in range(num_layers)]


# A trained model's values stay within a few hundred. Far beyond this bound a stored state was
# tampered with or had diverged: its square overflows float32, so every norm of it is Inf.
MAX_STATE_MAGNITUDE = 1e18


def value_problem(tensor: torch.Tensor) -> str | None:
    """Why a stored state tensor cannot be used (NaN, Inf, or absurdly large values), or None."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    if not bool(torch.isfinite(tensor).all()):
        return "holds NaN or Inf"
    if float(tensor.abs().max()) > MAX_STATE_MAGNITUDE:
        return f"holds values beyond {MAX_STATE_MAGNITUDE:g} in magnitude"
    return None


def checked_tensor(state: dict[str, torch.Tensor], key: str, like: torch.Tensor) -> torch.Tensor:
    """state[key], verified to have the shape and dtype of ``like`` and usable values (``value_problem``)."""
    if key not in state:
        raise ArtifactError(f"state has no tensor '{key}': it was saved by another model or algorithm")
    value = state[key]
    if value.shape != like.shape or value.dtype != like.dtype:
        raise ArtifactError(
            f"state tensor '{key}' has shape {tuple(value.shape)} {value.dtype}, "
            f"expected {tuple(like.shape)} {like.dtype}"
        )
    if problem := value_problem(value):
        raise ArtifactError(f"state tensor '{key}' {problem}")
    return value.to(like.device)


class Strategy(ABC):
    """A federated algorithm, seen by the orchestration as the phases of a round."""

    name: str
    client_rule: ClientRule = ClientRule()

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
    def personalized_layers(self, client_id: int) -> list[torch.Tensor | None]:
        """The server's part of the model client ``client_id`` is evaluated with (None for the
        client's private layers); the client rule completes it."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the server state, for checkpoints (safetensors-compatible)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict()`` output, checking names and shapes."""
