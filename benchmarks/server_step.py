"""server_step: the pFedLA server step against a naive reference, time and peak memory.

The library's step (``PFedLAStrategy.configure_fit`` + ``aggregate_fit``, every client taking
part) and a reference written the way public implementations are (N state dicts, one
hypernetwork module and one Adam per client), on a paper-size CIFAR-10 CNN. Each
(implementation, N) is measured in a fresh process (``worker``); ``reference_check`` first
asserts that both compute the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from common import PeakRss, Settings, log, measured_sizes, median_seconds, run_worker
from torch import nn

from pfedla.algorithms.pfedla import PFedLAStrategy
from pfedla.client import ClientUpdate
from pfedla.models import CNN, LayerLayout, initial_layers
from pfedla.registry import PFedLASettings
from pfedla.seeding import torch_generator

HN_DEFAULTS = PFedLASettings()  # embedding_dim, hidden_dim and hn_lr as in the default config

PEAK_METHOD = (
    "fresh subprocess per (implementation, N); after imports, server state, synthetic deltas and one "
    "warm-up (ours: a step, naive: one client): gc + malloc_trim, baseline = VmRSS, kernel peak counter "
    "reset (echo 5 > /proc/self/clear_refs); peak = getrusage(RUSAGE_SELF).ru_maxrss after the timed "
    "steps; reported: peak - baseline, MiB"
)


class NaiveHyperNetwork(nn.Module):
    """One client's hypernetwork, written the way public implementations write it.

    embedding -> Linear -> ReLU -> Linear -> ReLU -> one Linear head per layer -> ReLU,
    normalised over the N source clients.
    """

    def __init__(self, num_clients: int, num_layers: int, embedding_dim: int, hidden_dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(embedding_dim))
        self.fc1 = nn.Linear(embedding_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.heads = nn.ModuleList(nn.Linear(hidden_dim, num_clients) for _ in range(num_layers))

    def forward(self) -> list[torch.Tensor]:
        """α_i, one weight per source client for each layer."""
        hidden = torch.relu(self.fc2(torch.relu(self.fc1(self.embedding))))
        alphas = []
        for head in self.heads:
            positive = nn.functional.softplus(head(hidden)) + 1e-12
            alphas.append(positive / positive.sum())
        return alphas

    def batched_layout(self, tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors in ``self.parameters()`` order -> the shapes of one row of ``HyperNetworks``."""
        embedding, w1, b1, w2, b2, *heads = tensors
        return {
            "embeddings": embedding, "hidden.0": w1.T, "hidden.1": b1, "hidden.2": w2.T, "hidden.3": b2,
            "head_w": torch.stack([w.T for w in heads[0::2]]), "head_b": torch.stack(heads[1::2]),
        }

    @torch.no_grad()
    def load_row(self, row: dict[str, torch.Tensor]) -> None:
        """Copy client i's row of the batched hypernetworks into this module."""
        self.embedding.copy_(row["embeddings"])
        self.fc1.weight.copy_(row["hidden.0"].T)
        self.fc1.bias.copy_(row["hidden.1"])
        self.fc2.weight.copy_(row["hidden.2"].T)
        self.fc2.bias.copy_(row["hidden.3"])
        for layer, head in enumerate(self.heads):
            head.weight.copy_(row["head_w"][layer].T)
            head.bias.copy_(row["head_b"][layer])


class NaiveServer:
    """Reference pFedLA server: per client, stack all N state dicts, weight, sum, autograd.

    One hypernetwork module and one torch.optim.SGD per client; clients are handled one
    at a time, and the round is synchronous (every θ̄ and gradient uses the models from the
    start of the round), like the library's server step.
    """

    def __init__(self, client_params: list[dict[str, torch.Tensor]], layer_of: dict[str, int],
                 hypernetworks: list[NaiveHyperNetwork], lr: float):
        self.client_params, self.layer_of, self.hypernetworks = client_params, layer_of, hypernetworks
        self.optimizers = [torch.optim.SGD(hn.parameters(), lr=lr) for hn in hypernetworks]

    @classmethod
    def from_strategy(cls, strategy: PFedLAStrategy, layout: LayerLayout, lr: float) -> NaiveServer:
        """The same server state as ``strategy``, as N state dicts and N modules."""
        num_clients = strategy.num_clients
        client_params = [
            {k: v.clone() for k, v in layout.unflatten([rows[j] for rows in strategy.models.rows]).items()}
            for j in range(num_clients)
        ]
        layer_of = {slot.name: layer for layer, slots in enumerate(layout.slots) for slot in slots}
        batched = dict(strategy.hypernetworks.named_parameters())
        embedding_dim, hidden_dim = batched["hidden.0"].shape[1:]
        hypernetworks = []
        for i in range(num_clients):
            hn = NaiveHyperNetwork(num_clients, layout.num_layers, embedding_dim, hidden_dim)
            hn.to(batched["hidden.0"].dtype).load_row({k: p.detach()[i] for k, p in batched.items()})
            hypernetworks.append(hn)
        return cls(client_params, layer_of, hypernetworks, lr)

    def personalize(self, client: int) -> dict[str, torch.Tensor]:
        """θ̄_i for every parameter name, differentiable in HN_i when grad mode is on."""
        alpha = self.hypernetworks[client]()
        stacked = {name: torch.stack([params[name] for params in self.client_params])
                   for name in self.layer_of}
        return {
            name: torch.sum(alpha[self.layer_of[name]].view(-1, *[1] * (t.dim() - 1)) * t, dim=0)
            for name, t in stacked.items()
        }

    def layer_scales(self, delta: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Per layer, ‖Δ^l‖ times the mean over clients of ‖θ_j^l‖ (what divides the surrogate)."""
        def norm(params: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
            return torch.sqrt(sum(params[n].square().sum() for n, of in self.layer_of.items() if of == layer))
        layers = set(self.layer_of.values())
        return {layer: norm(delta, layer) * torch.stack([norm(p, layer) for p in self.client_params]).mean()
                for layer in layers}

    def configure_fit(self, clients: Sequence[int]) -> dict[int, dict[str, torch.Tensor]]:
        """θ̄_i for each of ``clients``, without autograd."""
        with torch.no_grad():
            return {i: self.personalize(i) for i in clients}

    def aggregate_fit(self, deltas: dict[int, dict[str, torch.Tensor]]) -> dict[int, list[torch.Tensor]]:
        """HN_i descent on grad(θ̄_i, ψ_i, grad_outputs=θ̄_i − θ_i'); θ_i ← θ̄_i + Δ_i. Returns the grads."""
        new_params, all_grads = {}, {}
        for i, delta in deltas.items():
            hn = self.hypernetworks[i]
            personalized = self.personalize(i)
            scale = self.layer_scales(delta)
            grads = torch.autograd.grad(
                outputs=list(personalized.values()),
                inputs=list(hn.parameters()),
                # θ̄ − θ' = −Δ, each layer divided by its scale
                grad_outputs=[-delta[name] / scale[self.layer_of[name]] for name in personalized],
            )
            for param, grad in zip(hn.parameters(), grads):
                param.grad = grad
            self.optimizers[i].step()
            self.optimizers[i].zero_grad(set_to_none=True)
            new_params[i] = {name: p.detach() + delta[name] for name, p in personalized.items()}
            all_grads[i] = list(grads)
        for i, params in new_params.items():
            self.client_params[i] = params
        return all_grads


def ours_step(strategy: PFedLAStrategy, round_idx: int, clients: Sequence[int],
              deltas: Sequence[Sequence[torch.Tensor]]) -> None:
    """The library's server step for one round; the instructions live until aggregation, as in a round."""
    instructions = strategy.configure_fit(round_idx, clients)
    updates = [ClientUpdate(c, 1, list(deltas[c]), 0.0) for c in clients]
    strategy.aggregate_fit(round_idx, updates, failures=[])
    del instructions


def naive_step(server: NaiveServer, clients: Sequence[int],
               deltas: Sequence[dict[str, torch.Tensor]]) -> None:
    """The naive reference's server step for one round, the counterpart of ``ours_step``."""
    personalized = server.configure_fit(clients)
    server.aggregate_fit({c: deltas[c] for c in clients})
    del personalized


def make_server(num_clients: int, width: int, hidden: int, seed: int = 0
                ) -> tuple[PFedLAStrategy, LayerLayout, int]:
    """A fresh pFedLA server for N clients on the CIFAR-10 CNN: strategy, layout, parameter count."""
    torch.manual_seed(seed)
    model = CNN(3, 32, 10, width=width, hidden=hidden)
    layout = LayerLayout.of(model)
    strategy = PFedLAStrategy(initial_layers(model), num_clients, replace(HN_DEFAULTS, heur_k=0),
                              torch_generator(seed, "hypernetworks"))
    return strategy, layout, sum(layout.sizes)


def synthetic_deltas(layout: LayerLayout, num_clients: int, seed: int, scale: float = 1e-3,
                     dtype: torch.dtype = torch.float32) -> list[list[torch.Tensor]]:
    """Seeded client deltas, uniform in ±scale, in the layout's shapes: one list of layers per client."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.empty(size, dtype=dtype).uniform_(-scale, scale, generator=generator)
             for size in layout.sizes] for _ in range(num_clients)]


def reference_check() -> None:
    """The naive reference and the library agree on θ̄, HN gradients, new models and new HNs."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # so the check is about the math, not rounding
    try:
        strategy, layout, _ = make_server(5, width=4, hidden=16, seed=3)
        generator = torch.Generator().manual_seed(4)
        for rows in strategy.models.rows:  # distinct client models, as after some rounds
            rows.copy_(torch.randn(rows.shape, generator=generator))
        naive = NaiveServer.from_strategy(strategy, layout, HN_DEFAULTS.hn_lr)
        deltas = synthetic_deltas(layout, 5, seed=5, scale=0.5, dtype=torch.float64)
        for round_idx, clients in enumerate([[0, 1, 2, 3, 4], [3, 0]]):
            instructions = strategy.configure_fit(round_idx, clients)
            bars = naive.configure_fit(clients)
            for c in clients:
                for ours, ref in zip(instructions[c].layers, layout.flatten(bars[c])):
                    torch.testing.assert_close(ours, ref)
            index = torch.tensor(clients)
            stacked = [torch.stack([deltas[c][layer] for c in clients]) for layer in range(len(layout.sizes))]
            ours_grads = strategy.hypernetwork_gradients(index, stacked)[0]
            ref_grads = naive.aggregate_fit({c: layout.unflatten(deltas[c]) for c in clients})
            updates = [ClientUpdate(c, 1, deltas[c], 0.0) for c in clients]
            strategy.aggregate_fit(round_idx, updates, failures=[])
            for c in clients:  # ours: gradients of the full [N, ...] parameters, row c for client c
                hn = naive.hypernetworks[c]
                for name, ref in hn.batched_layout(ref_grads[c]).items():
                    torch.testing.assert_close(ours_grads[name][c], ref, msg=f"grad {name} client {c}")
            batched = dict(strategy.hypernetworks.named_parameters())
            for c in range(5):
                ref_params = naive.hypernetworks[c].batched_layout(list(naive.hypernetworks[c].parameters()))
                for name, ref in ref_params.items():
                    torch.testing.assert_close(batched[name][c].detach(), ref.detach(), msg=f"HN {name} {c}")
                ours_model = [rows[c] for rows in strategy.models.rows]
                for ours, ref in zip(ours_model, layout.flatten(naive.client_params[c])):
                    torch.testing.assert_close(ours, ref, msg=f"model of client {c}")
    finally:
        torch.set_default_dtype(previous)


def worker(spec: dict) -> dict:
    """One implementation, one N, in a fresh process: median time and peak memory."""
    num_clients, impl, repeats = spec["clients"], spec["impl"], spec["repeats"]
    strategy, layout, num_params = make_server(num_clients, spec["width"], spec["hidden"])
    deltas = synthetic_deltas(layout, num_clients, seed=1)
    clients = list(range(num_clients))
    if impl == "naive":
        server = NaiveServer.from_strategy(strategy, layout, HN_DEFAULTS.hn_lr)
        del strategy
        named = [layout.unflatten(d) for d in deltas]

        def step() -> None:
            naive_step(server, clients, named)

        naive_step(server, clients[:1], named)  # warm-up: one client (a full step costs minutes)
    else:
        rounds = iter(range(10**6))

        def step() -> None:
            ours_step(strategy, next(rounds), clients, deltas)

        step()  # warm-up
    with PeakRss() as peak:
        seconds, times = median_seconds(step, repeats, spec["budget_s"])
    return {"seconds": seconds, "times": times, "params": num_params, **peak.as_dict()}


def bench(settings: Settings) -> dict:
    """The reference check, then ours and naive for each N, each in a fresh process."""
    log("reference check (naive vs ours, float64, N=5, 2 rounds)")
    reference_check()
    log("reference check: ok")
    model = dict(settings.server_model)
    result: dict = {
        "model": f"CNN(in_channels=3, image_size=32, num_classes=10, width={model['width']}, "
                 f"hidden={model['hidden']})",
        "embedding_dim": HN_DEFAULTS.embedding_dim,
        "hidden_dim": HN_DEFAULTS.hidden_dim,
        "repeats": settings.server_repeats,
        "repeat_budget_s": settings.server_budget_s,
        "peak_memory_method": PEAK_METHOD,
        "reference_check": "ok",
    }
    for n in settings.server_clients:
        row = {}
        for impl in ("ours", "naive"):
            log(f"server_step N={n} {impl}: up to {settings.server_repeats} repeat(s) in a fresh process")
            measured = run_worker({"kind": "server_step", "impl": impl, "clients": n,
                                   "repeats": settings.server_repeats,
                                   "budget_s": settings.server_budget_s, **model})
            result["params"] = measured["params"]
            row[f"{impl}_s"] = measured["seconds"]
            row[f"{impl}_times_s"] = measured["times"]
            row[f"{impl}_peak_mb"] = measured["peak_delta_mb"]
            row[f"{impl}_baseline_rss_mb"] = measured["baseline_rss_mb"]
            log(f"  {impl}: median {measured['seconds']:.2f} s of {len(measured['times'])}, "
                f"peak +{measured['peak_delta_mb']:.0f} MiB")
        row["speedup"] = row["naive_s"] / row["ours_s"]
        row["memory_ratio"] = row["naive_peak_mb"] / max(row["ours_peak_mb"], 1e-9)
        result[str(n)] = row
    return result


def table(result: dict) -> list[str]:
    """The section's lines of the printed table, ending with a blank separator line."""
    lines = [
        f"server step: {result['params']:,}-parameter CNN, all N clients, median wall time; "
        "peak = RSS above setup (MiB)",
        f"{'N':>6}{'ours s':>10}{'naive s':>10}{'speedup':>9}{'ours MiB':>10}{'naive MiB':>11}"
        f"{'naive/ours':>12}",
    ]
    for key, row in measured_sizes(result):
        lines.append(f"{key:>6}{row['ours_s']:>10.2f}{row['naive_s']:>10.2f}{row['speedup']:>8.1f}x"
                     f"{row['ours_peak_mb']:>10.0f}{row['naive_peak_mb']:>11.0f}"
                     f"{row['memory_ratio']:>11.2f}x")
    lines.append("")
    return lines
