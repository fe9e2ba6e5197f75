"""pFedHN: one server hypernetwork generates every client's whole model from a learned embedding.

Shamsian et al. (ICML 2021). The server holds a hypernetwork h(v; φ) shared by all clients and
one embedding v_i per client; h is an MLP on v_i followed by one linear head per model layer
that outputs the layer's flat parameters, so θ_i = h(v_i; φ).

Round, for the participating clients S:
  1. the server sends θ_i = h(v_i; φ)                                   (``configure_fit``)
  2. client i trains from θ_i and returns Δ_i = θ_i' − θ_i
  3. φ and v take one *descent* step on J = (1/|S|) Σ_i ½‖h(v_i; φ) − θ_i'‖², θ_i' held fixed,
     whose gradient at the current point is (1/|S|) Σ_i (∂θ_i/∂(φ, v))ᵀ (θ_i − θ_i'), i.e.
     autograd with grad_outputs = θ_i − θ_i' = −Δ_i                     (``hypernetwork_gradients``)

pFedLA's surrogate gradient is this rule applied to α instead of to whole models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pfedla.algorithms.base import BuildContext, FitInstruction, Strategy, checked_tensor, stacked_deltas
from pfedla.algorithms.optim import RowwiseAdam, SharedAdam
from pfedla.client import ClientFailure, ClientUpdate
from pfedla.registry import PFedHNSettings


class ModelHyperNetwork(nn.Module):
    """h(v_i; φ): embedding v_i -> two ReLU layers -> one linear head per target layer -> θ_i^l.

    The head biases start as the target model's initial parameters and the head weights at zero,
    so every client's first model is exactly the model the other algorithms start from.
    """

    def __init__(self, init_layers: Sequence[torch.Tensor], num_clients: int, embedding_dim: int,
                 hidden_dim: int, generator: torch.Generator):
        super().__init__()
        dtype = init_layers[0].dtype  # the target model's: float64 models get a float64 hypernetwork

        def normal(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter((torch.randn(*shape, generator=generator) * std).to(dtype))

        emb, hid = embedding_dim, hidden_dim
        self.embeddings = normal(num_clients, emb, std=1.0)
        self.w1 = normal(emb, hid, std=emb**-0.5)
        self.b1 = nn.Parameter(torch.zeros(hid, dtype=dtype))
        self.w2 = normal(hid, hid, std=hid**-0.5)
        self.b2 = nn.Parameter(torch.zeros(hid, dtype=dtype))
        self.head_w = nn.ParameterList(torch.zeros(hid, layer.numel(), dtype=dtype) for layer in init_layers)
        self.head_b = nn.ParameterList(layer.detach().reshape(-1).clone() for layer in init_layers)

    def forward(self, clients: torch.Tensor) -> list[torch.Tensor]:
        """θ for the given clients: one [S, P_l] tensor per layer."""
        hidden = torch.relu(self.embeddings[clients] @ self.w1 + self.b1)
        hidden = torch.relu(hidden @ self.w2 + self.b2)
        heads = zip(self.head_w, self.head_b, strict=True)
        return [torch.addmm(bias, hidden, weight) for weight, bias in heads]


def objective_output_grads(deltas: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """∂J/∂θ_s = (θ_s − θ'_s)/S = −Δ_s/S per layer, from the round's Δ ([S, P_l] per layer).

    The sign is the whole difference between descent and the ascent bug: grad_outputs = +Δ would
    move each generated model away from the model its client trained.
    """
    return [-delta / delta.shape[0] for delta in deltas]


class PFedHNStrategy(Strategy):
    """Server side of pFedHN; client i is evaluated with h(v_i) after the last update."""

    name = "pfedhn"

    def __init__(self, init_layers: Sequence[torch.Tensor], num_clients: int, *, lr: float,
                 embedding_dim: int, hidden_dim: int, generator: torch.Generator):
        device = init_layers[0].device
        self.hypernetwork = ModelHyperNetwork(init_layers, num_clients, embedding_dim, hidden_dim,
                                              generator).to(device)
        self.num_layers = len(init_layers)
        shared = {k: p for k, p in self.hypernetwork.named_parameters() if k != "embeddings"}
        self.shared_optimizer = SharedAdam(shared, lr)
        # An embedding belongs to one client: per-row Adam leaves clients outside the round exactly
        # where they were (plain Adam would move them by momentum).
        self.embedding_optimizer = RowwiseAdam({"embeddings": self.hypernetwork.embeddings}, num_clients,
                                               lr)

    def _client_index(self, clients: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(list(clients), dtype=torch.long, device=self.hypernetwork.b1.device)

    def configure_fit(self, round_idx: int, clients: Sequence[int]) -> dict[int, FitInstruction]:
        with torch.no_grad():
            models = self.hypernetwork(self._client_index(clients))
        return {client: FitInstruction([layer[row] for layer in models])
                for row, client in enumerate(clients)}

    def hypernetwork_gradients(self, clients: torch.Tensor, deltas: Sequence[torch.Tensor]
                               ) -> dict[str, torch.Tensor]:
        """∂J/∂(φ, v) for J = (1/S) Σ_s ½‖h(v_{clients[s]}) − θ'_s‖² with θ' = h + Δ held fixed.

        ``deltas`` holds one [S, P_l] tensor per layer (row s: client clients[s]). Averaging over the
        round's clients keeps the gradient's scale independent of how many took part.
        """
        models = self.hypernetwork(clients)
        params = dict(self.hypernetwork.named_parameters())
        grads = torch.autograd.grad(models, list(params.values()),
                                    grad_outputs=objective_output_grads(deltas))
        return dict(zip(params, grads, strict=True))

    def aggregate_fit(
        self, round_idx: int, updates: Sequence[ClientUpdate], failures: Sequence[ClientFailure]
    ) -> dict[str, float]:
        if not updates:
            return {}
        clients = self._client_index([u.client_id for u in updates])
        deltas = stacked_deltas(updates, self.num_layers)
        grads = self.hypernetwork_gradients(clients, deltas)
        self.shared_optimizer.step(grads)
        self.embedding_optimizer.step({"embeddings": grads["embeddings"]}, clients)
        return {}

    def personalized_layers(self, client_id: int) -> list[torch.Tensor]:
        """h(v_i): the model the hypernetwork generates for the client now."""
        with torch.no_grad():
            return [layer[0] for layer in self.hypernetwork(self._client_index([client_id]))]

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"hn.{k}": p.detach() for k, p in self.hypernetwork.named_parameters()}
        state.update(self.shared_optimizer.state_dict())
        state.update(self.embedding_optimizer.state_dict())
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param in self.hypernetwork.named_parameters():
                param.copy_(checked_tensor(state, f"hn.{name}", param))
        self.shared_optimizer.load_state_dict(state)
        self.embedding_optimizer.load_state_dict(state)


def build(settings: PFedHNSettings, context: BuildContext) -> PFedHNStrategy:
    return PFedHNStrategy(context.init_layers, context.num_clients, lr=settings.lr,
                          embedding_dim=settings.embedding_dim, hidden_dim=settings.hidden_dim,
                          generator=context.generator("hypernetworks"))
