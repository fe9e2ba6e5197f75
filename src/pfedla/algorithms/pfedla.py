"""pFedLA: personalized federated learning with layer-wise aggregation (and HeurpFedLA).

Notation (see DESIGN.md): N clients, L layers, client i's model θ_i = {θ_i^l}.
The server keeps every client's latest model in one [N, P_l] tensor per layer (Θ^l) and,
per client, a hypernetwork HN_i that outputs α_i ∈ R^{L×N}: α_ij^l ≥ 0, Σ_j α_ij^l = 1.

Round, for each participating client i:
  1. θ̄_i^l = Σ_j α_ij^l θ_j^l                       (``aggregate_layers``)
  2. the client trains from θ̄_i and returns Δ_i = θ_i' − θ̄_i
  3. θ_i ← θ̄_i + Δ_i, and HN_i takes a plain gradient *descent* step on the surrogate whose
     gradient is (∂θ̄_i/∂ψ_i)ᵀ (θ̄_i − θ_i') = −(∂θ̄_i/∂ψ_i)ᵀ Δ_i   (``surrogate_alpha_grad``),
     with each layer's term divided by ``layer_scales`` (``step`` "scaled": ‖Δ_i^l‖ times the
     size of θ^l; "annealed": the size of θ^l squared; "plain": 1, the paper's unscaled step).

Client i's personalized model is θ̄_i formed with the current α and client models.
All hypernetworks are evaluated as one batched computation; clients outside the round are untouched.
``pfedla`` and ``pfedla_paper`` are this one strategy with different settings (registry.py);
docs/algorithm.md lists each difference and its measured effect.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from pfedla.algorithms.base import (
    BuildContext,
    FitInstruction,
    ModelStack,
    Strategy,
    checked_tensor,
    stacked_deltas,
)
from pfedla.client import ClientFailure, ClientUpdate
from pfedla.registry import HyperNetworkSettings, PFedLASettings

ALPHA_FLOOR = 1e-12  # keeps α defined (uniform) if every head output underflows to zero


def normalize_heads(head_outputs: torch.Tensor, heads: str = "softplus") -> torch.Tensor:
    """Make the head outputs positive, then normalise over source clients (last dim): α ≥ 0, Σ_j α_j = 1.

    ``heads`` "softplus" (the smooth ReLU, pfedla) or "relu" (the paper's). A ReLU head at or below
    zero has exactly zero gradient, so its α entry (then ~1e-13) can never come back even where
    trusting that client later helps; in the MNIST study about 80% of all α entries were there by
    round 10 (docs/study.md).
    """
    raw = torch.relu(head_outputs) if heads == "relu" else nn.functional.softplus(head_outputs)
    positive = raw + ALPHA_FLOOR
    return positive / positive.sum(dim=-1, keepdim=True)


def aggregate_layers(alpha: torch.Tensor, stack: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """θ̄ for a batch of clients: alpha [S, L, N] and Θ^l [N, P_l] -> one [S, P_l] per layer."""
    return [alpha[:, layer, :] @ rows for layer, rows in enumerate(stack)]


def surrogate_alpha_grad(deltas: Sequence[torch.Tensor], stack: Sequence[torch.Tensor]) -> torch.Tensor:
    """∂/∂α of Σ_l <θ̄^l, θ̄^l − θ'^l> with the second factor fixed: [S, L, N].

    θ̄_i^l − θ_i'^l = −Δ_i^l and ∂θ̄_i^l/∂α_ij^l = θ_j^l, so the entry is −<Δ_i^l, θ_j^l>.
    Back-propagating it through α is exactly grad(θ̄, ψ, grad_outputs=θ̄ − θ').
    """
    return torch.stack([-(delta @ rows.T) for delta, rows in zip(deltas, stack, strict=True)], dim=1)


def layer_scales(deltas: Sequence[torch.Tensor], stack: Sequence[torch.Tensor], step: str = "scaled"
                 ) -> torch.Tensor:
    """What divides each layer's surrogate term: [S, L]. ``step`` "scaled": ‖Δ_s^l‖ times the mean
    norm of the client models' layer l; "annealed": that mean norm squared; "plain": 1.

    Both divisors make each layer's term dimensionless, so one ``hn_lr`` fits any model and layer,
    and the step grows with how different the clients' models are (α stays near uniform where
    clients are alike and personalizes where they are not, docs/study.md). "scaled" is a cosine
    between the update and the models' deviations: it does not shrink as the updates do, so late in
    a long run α keeps moving at full speed toward what the client's own fit prefers (on iid data
    toward self-weights, issue 20). "annealed" keeps ‖Δ‖ in the step, which then shrinks with the
    updates, as the paper's plain step does.
    """
    norms = torch.stack([rows.norm(dim=1).mean() for rows in stack])  # [L]
    if step == "plain":
        scales = torch.ones(len(deltas[0]), len(stack), dtype=stack[0].dtype, device=stack[0].device)
    elif step == "annealed":
        scales = (norms**2).expand(len(deltas[0]), -1)
    else:
        scales = torch.stack([delta.norm(dim=1) for delta in deltas], dim=1) * norms
    return scales.clamp_min(torch.finfo(stack[0].dtype).tiny)


def self_weights(alpha: torch.Tensor, clients: torch.Tensor) -> torch.Tensor:
    """α_ii^l, what each client gives its own model per layer: [S, L] from alpha [S, L, N]."""
    return alpha[torch.arange(len(clients)), :, clients]


def heuristic_keep_mask(alpha: torch.Tensor, clients: torch.Tensor, k: int) -> torch.Tensor:
    """HeurpFedLA: per client, the k layers with the largest self-weight α_ii^l. [S, L] bool."""
    keep = torch.zeros(alpha.shape[:2], dtype=torch.bool, device=alpha.device)
    if k <= 0:
        return keep
    top = self_weights(alpha, clients).topk(k, dim=1).indices  # k < layers: validated with the config
    return keep.scatter(1, top, True)


def apply_keep_mask(alpha: torch.Tensor, keep: torch.Tensor, clients: torch.Tensor) -> torch.Tensor:
    """Replace α by one-hot(i) on the layers client i keeps local."""
    own = nn.functional.one_hot(clients, alpha.shape[2]).to(alpha.dtype)[:, None, :]
    return torch.where(keep[:, :, None], own, alpha)


class HyperNetworks(nn.Module):
    """N hypernetworks evaluated together: embedding v_i -> MLP -> one head per layer -> α_i.

    The shape and initialization are ``settings``' (registry.HyperNetworkSettings): ``init``
    "near_uniform" draws hidden weights N(0, 1/fan_in) with zero bias and head weights N(0, small)
    with bias 1, so α starts at uniform (FedAvg); "paper" is the public code's, PyTorch's default
    Linear init U(±1/sqrt(fan_in)) for the hidden layers and heads U(0, 1) with bias 0.
    """

    def __init__(self, num_clients: int, num_layers: int, settings: HyperNetworkSettings,
                 generator: torch.Generator):
        super().__init__()

        def normal(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=generator) * std)

        def uniform(*shape: int, low: float, high: float) -> nn.Parameter:
            return nn.Parameter(torch.rand(*shape, generator=generator) * (high - low) + low)

        n, hid, paper = num_clients, settings.hidden_dim, settings.init == "paper"
        self.heads = settings.heads
        self.embeddings = normal(n, settings.embedding_dim, std=1.0)
        widths = [settings.embedding_dim] + [hid] * settings.hidden_layers
        self.hidden = nn.ParameterList()  # weight [N, in, out], bias [N, out], alternating
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
            bound = fan_in**-0.5
            if paper:
                self.hidden.extend([uniform(n, fan_in, fan_out, low=-bound, high=bound),
                                    uniform(n, fan_out, low=-bound, high=bound)])
            else:
                self.hidden.extend([normal(n, fan_in, fan_out, std=bound),
                                    nn.Parameter(torch.zeros(n, fan_out))])
        if paper:
            self.head_w = uniform(n, num_layers, hid, n, low=0.0, high=1.0)
            self.head_b = nn.Parameter(torch.zeros(n, num_layers, n))
        else:  # small head weights and a constant bias: α starts close to uniform (FedAvg-like)
            self.head_w = normal(n, num_layers, hid, n, std=0.01 * hid**-0.5)
            self.head_b = nn.Parameter(torch.ones(n, num_layers, n))

    def forward(self, clients: torch.Tensor) -> torch.Tensor:
        """α for the given clients: [S, L, N]."""
        hidden = self.embeddings[clients]
        for weight, bias in zip(self.hidden[::2], self.hidden[1::2], strict=True):
            hidden = torch.relu(torch.einsum("se,seh->sh", hidden, weight[clients]) + bias[clients])
        heads = torch.einsum("sh,slhn->sln", hidden, self.head_w[clients]) + self.head_b[clients]
        return normalize_heads(heads, self.heads)


class PFedLAStrategy(Strategy):
    """Server side of pFedLA with ``settings`` (registry.PFedLASettings); ``heur_k > 0`` gives
    HeurpFedLA, ``hn_lr = 0`` frozen α."""

    name = "pfedla"

    def __init__(self, init_layers: Sequence[torch.Tensor], num_clients: int, settings: PFedLASettings,
                 generator: torch.Generator):
        device = init_layers[0].device
        self.models = ModelStack(init_layers, num_clients)
        self.hypernetworks = HyperNetworks(num_clients, len(init_layers), settings, generator).to(device)
        self.settings, self.num_clients = settings, num_clients
        self.hn_lr, self.heur_k = settings.hn_lr, settings.heur_k

    def _alpha(self, clients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α with HeurpFedLA's one-hot rows applied, keep mask), differentiable in ψ."""
        alpha = self.hypernetworks(clients)
        keep = heuristic_keep_mask(alpha.detach(), clients, self.heur_k)
        return apply_keep_mask(alpha, keep, clients), keep

    def _client_index(self, clients: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(list(clients), dtype=torch.long, device=self.models.rows[0].device)

    def configure_fit(self, round_idx: int, clients: Sequence[int]) -> dict[int, FitInstruction]:
        index = self._client_index(clients)
        with torch.no_grad():
            alpha, keep = self._alpha(index)
            personalized = aggregate_layers(alpha, self.models.rows)
        return {
            client: FitInstruction(
                [layer[row] for layer in personalized],
                kept_local=frozenset(torch.nonzero(keep[row]).flatten().tolist()),
            )
            for row, client in enumerate(clients)
        }

    def hypernetwork_gradients(
        self, clients: torch.Tensor, deltas: Sequence[torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Surrogate gradients of every HN parameter, plus the α they were taken at.

        ``deltas`` holds one [S, P_l] tensor per layer (row s: client clients[s]); with the
        layer l's term of the surrogate is divided by ``layer_scales`` for the ``step`` setting.
        Layers a client kept local (HeurpFedLA) contribute no gradient.
        """
        alpha, keep = self._alpha(clients)
        grad_alpha = surrogate_alpha_grad(deltas, self.models.rows)
        grad_alpha = grad_alpha / layer_scales(deltas, self.models.rows, self.settings.step)[:, :, None]
        # Where every client holds the same layer (all of them in round 0), θ̄ does not depend on α
        # and the true gradient is exactly zero; the matrix product leaves ~1e-7 of rounding, which
        # must not move α in a random direction.
        same = torch.tensor([all(torch.equal(rows[0], row) for row in rows[1:]) for rows in self.models.rows],
                            device=grad_alpha.device)
        grad_alpha = grad_alpha.masked_fill(keep[:, :, None] | same[None, :, None], 0.0)
        params = dict(self.hypernetworks.named_parameters())
        grads = torch.autograd.grad(alpha, list(params.values()), grad_outputs=grad_alpha,
                                    allow_unused=True)
        named = {
            name: torch.zeros_like(p) if g is None else g
            for (name, p), g in zip(params.items(), grads, strict=True)
        }
        return named, alpha.detach()

    def aggregate_fit(
        self, round_idx: int, updates: Sequence[ClientUpdate], failures: Sequence[ClientFailure]
    ) -> dict[str, float]:
        if not updates:
            return {}
        clients = self._client_index([u.client_id for u in updates])
        deltas = stacked_deltas(updates, len(self.models.rows))
        grads, alpha = self.hypernetwork_gradients(clients, deltas)
        # Θ must change only after the gradient: both use the Θ that formed θ̄ this round.
        # θ' = θ̄ + Δ = αΘ + Δ is formed inside the stacked deltas: no [S, P_l] temporaries.
        for layer, (rows, delta) in enumerate(zip(self.models.rows, deltas, strict=True)):
            rows[clients] = delta.addmm_(alpha[:, layer], rows)
        if self.hn_lr > 0:
            # Plain gradient descent, as in the paper: the step keeps the gradient's size, which is
            # small where the clients' models barely differ. An optimizer that normalizes the step
            # (Adam) turned the small but consistent pull towards the client's own model on iid
            # data into full-size steps, and α collapsed onto self-weights of 1 (docs/study.md).
            with torch.no_grad():
                for name, param in self.hypernetworks.named_parameters():
                    param[clients] -= self.hn_lr * grads[name][clients]
        return alpha_metrics(alpha, clients)

    def layer_weights(self) -> torch.Tensor:
        """Current α for every client: [N, L, N] (client, layer, source client), as used to aggregate
        (with HeurpFedLA, one-hot(i) on the layers client i keeps local)."""
        with torch.no_grad():
            alpha, _ = self._alpha(self._client_index(range(self.num_clients)))
        return alpha

    def raw_layer_weights(self) -> torch.Tensor | None:
        """With HeurpFedLA, α as the hypernetworks output it, before the kept layers' one-hot rows:
        the trust they learned, [N, L, N]. None without it (``heur_k = 0``), where that is
        ``layer_weights()`` itself."""
        if self.heur_k <= 0:
            return None
        with torch.no_grad():
            return self.hypernetworks(self._client_index(range(self.num_clients)))

    def personalized_layers(self, client_id: int) -> list[torch.Tensor]:
        """θ̄_i = Σ_j α_ij θ_j with the current α and client models: the paper's personalized model,
        and the one client i would start its next round from. (Its own last trained model θ_i lacks
        what the others learned since: on iid data it scored ~2 points below θ̄_i, docs/study.md.)"""
        with torch.no_grad():
            alpha, _ = self._alpha(self._client_index([client_id]))
            return [layer[0] for layer in aggregate_layers(alpha, self.models.rows)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = self.models.state_dict("models")
        state.update({f"hn.{k}": p.detach() for k, p in self.hypernetworks.named_parameters()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.models.load_state_dict(state, "models")
        with torch.no_grad():
            for name, param in self.hypernetworks.named_parameters():
                param.copy_(checked_tensor(state, f"hn.{name}", param))


def alpha_metrics(alpha: torch.Tensor, clients: torch.Tensor) -> dict[str, float]:
    """Mean entropy of α over sources and mean self-weight α_ii, over clients and layers."""
    entropy = -(alpha * alpha.clamp_min(1e-12).log()).sum(-1)
    return {"alpha_entropy": float(entropy.mean()),
            "alpha_self_weight": float(self_weights(alpha, clients).mean())}


def build(settings: PFedLASettings, context: BuildContext) -> PFedLAStrategy:
    """pfedla and pfedla_paper: the strategy with the section's settings."""
    return PFedLAStrategy(context.init_layers, context.num_clients, settings,
                          context.generator("hypernetworks"))


def build_frozen(settings: HyperNetworkSettings, context: BuildContext) -> PFedLAStrategy:
    """The ablation: α stays what the untrained hypernetworks output."""
    frozen = PFedLASettings(**dataclasses.asdict(settings), hn_lr=0.0)
    return PFedLAStrategy(context.init_layers, context.num_clients, frozen,
                          context.generator("hypernetworks"))
