#!/usr/bin/env python
"""pfedla performance benchmarks: prints a table, writes benchmarks/results/latest.json.

    python benchmarks/run.py [--quick]            (make bench / make bench QUICK=1)

Sections (each one function returning plain JSON data; add new ones to ``SECTIONS``):

  server_step     the pFedLA server step (configure_fit + aggregate_fit, every client taking
                  part) against a naive reference that stacks all N state dicts per client,
                  on a paper-size CIFAR-10 CNN (~18M parameters)
  round_overhead  one default simulation round against the pure compute it contains
  scaling         synthetic data, N = 10, 100, 1000 clients at 10% participation
  pipeline_overhead  the pipeline under kfp.local against the same steps in-process
  data_movement   bytes per round through object storage at N=30 with the 18M CNN, before
                  (whole artifacts per pod) and after (the data plane)

Memory is measured in a fresh subprocess per measurement (see ``PeakRss``); timings are
medians over repeats, and every comparison is measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning. With spinning threads, rounds made of many
# small ops ran 25-50x slower whenever other processes competed for the 2 cores (synthetic
# N=1000: 115-170 s per round instead of 3.3 s). It must be set before torch loads OpenMP;
# export OMP_WAIT_POLICY yourself to measure with another policy. Workers inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pfedla.algorithms import make_strategy  # noqa: E402
from pfedla.algorithms.pfedla import PFedLAStrategy  # noqa: E402
from pfedla.client import ClientUpdate  # noqa: E402
from pfedla.config import ExperimentConfig, config_from_dict, load_config  # noqa: E402
from pfedla.data import build_federated_data  # noqa: E402
from pfedla.models import CNN, LayerLayout, build_model, initial_layers  # noqa: E402
from pfedla.seeding import torch_generator  # noqa: E402

THREADS = 2
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIB = 2**20
# Paper-style CIFAR-10 CNN: conv 3->64->128 (5x5), fc 8192->2176->10: 18,059,530 parameters.
PAPER_CNN = {"width": 64, "hidden": 2176}
# --quick: the same CNN with a quarter of fc1 (4,672,234 parameters), so the naive reference
# at N=30 takes well under a minute.
QUICK_CNN = {"width": 64, "hidden": 544}
HN_DEFAULTS = ExperimentConfig()  # embedding_dim, hidden_dim and hn_lr as in the default config

PEAK_METHOD = (
    "fresh subprocess per (implementation, N); after imports, server state, synthetic deltas and one "
    "warm-up (ours: a step, naive: one client): gc + malloc_trim, baseline = VmRSS, kernel peak counter "
    "reset (echo 5 > /proc/self/clear_refs); peak = getrusage(RUSAGE_SELF).ru_maxrss after the timed "
    "steps; reported: peak - baseline, MiB"
)


@dataclass(frozen=True)
class Settings:
    """How much work each section does: full (make bench) or quick (make bench QUICK=1)."""

    quick: bool
    server_model: tuple[tuple[str, int], ...] = tuple(PAPER_CNN.items())
    server_clients: tuple[int, ...] = (10, 30)
    server_repeats: int = 3
    # A measurement stops repeating once another repeat would take it past this many
    # seconds (at least one repeat always runs): keeps `make bench` under 15 minutes.
    server_budget_s: float = 240.0
    overhead_rounds: int = 15
    scaling_clients: tuple[int, ...] = (10, 100, 1000)
    scaling_rounds: int = 3

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(quick=True, server_model=tuple(QUICK_CNN.items()), server_repeats=1,
                       overhead_rounds=5, scaling_rounds=1)
        return cls(quick=False)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def median_seconds(fn: Callable[[], object], repeats: int, budget_s: float = float("inf")
                   ) -> tuple[float, list[float]]:
    """Median wall time of up to ``repeats`` calls; stops early when the next would exceed the budget."""
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) + times[-1] <= budget_s):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


# --------------------------------------------------------------------------- memory


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{key} not in /proc/self/status")


def _release_free_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only: return freed heap to the OS
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRss:
    """Peak RSS of this process during a ``with`` block, above the RSS it entered with.

    Meant for a fresh process that does only the workload: earlier peaks (imports, setup)
    are cleared through /proc/self/clear_refs so ru_maxrss restarts from the current RSS.
    """

    def __enter__(self) -> PeakRss:
        _release_free_memory()
        self.setup_peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.baseline_mib = _status_mib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            self.reset = True
        except OSError:
            self.reset = False  # ru_maxrss then also covers setup: an upper bound
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.delta_mib = self.peak_mib - self.baseline_mib

    def as_dict(self) -> dict[str, float | bool]:
        return {
            "baseline_rss_mb": round(self.baseline_mib, 1),
            "peak_rss_mb": round(self.peak_mib, 1),
            "peak_delta_mb": round(self.delta_mib, 1),
            "setup_peak_rss_mb": round(self.setup_peak_mib, 1),
            "peak_reset": self.reset,
        }


def run_worker(spec: dict) -> dict:
    """Run ``spec`` in a fresh interpreter (this file with --worker) and return its result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec), "--out", str(out)],
                       check=True)
        return json.loads(out.read_text())


# --------------------------------------------------------------------------- naive reference


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
        hidden = torch.relu(self.fc2(torch.relu(self.fc1(self.embedding))))
        alphas = []
        for head in self.heads:
            positive = torch.relu(head(hidden)) + 1e-12
            alphas.append(positive / positive.sum())
        return alphas

    def batched_layout(self, tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors in ``self.parameters()`` order -> the shapes of one row of ``HyperNetworks``."""
        embedding, w1, b1, w2, b2, *heads = tensors
        return {
            "embeddings": embedding, "w1": w1.T, "b1": b1, "w2": w2.T, "b2": b2,
            "head_w": torch.stack([w.T for w in heads[0::2]]), "head_b": torch.stack(heads[1::2]),
        }

    @torch.no_grad()
    def load_row(self, row: dict[str, torch.Tensor]) -> None:
        """Copy client i's row of the batched hypernetworks into this module."""
        self.embedding.copy_(row["embeddings"])
        self.fc1.weight.copy_(row["w1"].T)
        self.fc1.bias.copy_(row["b1"])
        self.fc2.weight.copy_(row["w2"].T)
        self.fc2.bias.copy_(row["b2"])
        for layer, head in enumerate(self.heads):
            head.weight.copy_(row["head_w"][layer].T)
            head.bias.copy_(row["head_b"][layer])


class NaiveServer:
    """Reference pFedLA server: per client, stack all N state dicts, weight, sum, autograd.

    One hypernetwork module and one torch.optim.Adam per client; clients are handled one
    at a time, and the round is synchronous (every θ̄ and gradient uses the models from the
    start of the round), like the library's server step.
    """

    def __init__(self, client_params: list[dict[str, torch.Tensor]], layer_of: dict[str, int],
                 hypernetworks: list[NaiveHyperNetwork], lr: float):
        self.client_params, self.layer_of, self.hypernetworks = client_params, layer_of, hypernetworks
        self.optimizers = [torch.optim.Adam(hn.parameters(), lr=lr) for hn in hypernetworks]

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
        embedding_dim, hidden_dim = batched["w1"].shape[1:]
        hypernetworks = []
        for i in range(num_clients):
            hn = NaiveHyperNetwork(num_clients, layout.num_layers, embedding_dim, hidden_dim)
            hn.to(batched["w1"].dtype).load_row({k: p.detach()[i] for k, p in batched.items()})
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

    def configure_fit(self, clients: Sequence[int]) -> dict[int, dict[str, torch.Tensor]]:
        with torch.no_grad():
            return {i: self.personalize(i) for i in clients}

    def aggregate_fit(self, deltas: dict[int, dict[str, torch.Tensor]]) -> dict[int, list[torch.Tensor]]:
        """HN_i descent on grad(θ̄_i, ψ_i, grad_outputs=θ̄_i − θ_i'); θ_i ← θ̄_i + Δ_i. Returns the grads."""
        new_params, all_grads = {}, {}
        for i, delta in deltas.items():
            hn = self.hypernetworks[i]
            personalized = self.personalize(i)
            grads = torch.autograd.grad(
                outputs=list(personalized.values()),
                inputs=list(hn.parameters()),
                grad_outputs=[-delta[name] for name in personalized],  # θ̄ − θ' = −Δ
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
    personalized = server.configure_fit(clients)
    server.aggregate_fit({c: deltas[c] for c in clients})
    del personalized


def make_server(num_clients: int, width: int, hidden: int, seed: int = 0
                ) -> tuple[PFedLAStrategy, LayerLayout, int]:
    torch.manual_seed(seed)
    model = CNN(3, 32, 10, width=width, hidden=hidden)
    layout = LayerLayout.of(model)
    strategy = PFedLAStrategy(
        initial_layers(model), num_clients, hn_lr=HN_DEFAULTS.hn_lr,
        embedding_dim=HN_DEFAULTS.embedding_dim, hidden_dim=HN_DEFAULTS.hidden_dim, heur_k=0,
        generator=torch_generator(seed, "hypernetworks"),
    )
    return strategy, layout, sum(layout.sizes)


def synthetic_deltas(layout: LayerLayout, num_clients: int, seed: int, scale: float = 1e-3,
                     dtype: torch.dtype = torch.float32) -> list[list[torch.Tensor]]:
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


def server_step_worker(spec: dict) -> dict:
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


def bench_server_step(settings: Settings) -> dict:
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


# --------------------------------------------------------------------------- round overhead


def timed_into(fn: Callable, totals: dict[str, float], key: str) -> Callable:
    """``fn``, adding the wall time of every call to ``totals[key]``."""
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - started
    return wrapper


def bench_round_overhead(settings: Settings) -> dict:
    """A default simulation round (pfedla) vs the same forward/backward/SGD steps in a tight loop."""
    import pfedla.simulation as simulation

    config = load_config()
    device = torch.device("cpu")
    data = build_federated_data(config)
    sim = simulation.Simulation(config, data, device, tracker=None, progress=False)
    strategy = make_strategy("pfedla", config, initial_layers(sim.model))

    phase = {"server": 0.0, "clients": 0.0}
    strategy.configure_fit = timed_into(strategy.configure_fit, phase, "server")  # type: ignore[method-assign]
    strategy.aggregate_fit = timed_into(strategy.aggregate_fit, phase, "server")  # type: ignore[method-assign]
    original_fit_client = simulation.fit_client
    simulation.fit_client = timed_into(original_fit_client, phase, "clients")

    plain = build_model(config.model, data.input_shape, data.num_classes, config.seed).to(device)
    params = list(plain.parameters())

    def batches(round_idx: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The round's (x, y, batch indices), drawn exactly like ``fit_client`` draws them."""
        out = []
        for c in simulation.participants(config, round_idx):
            shard = sim.shards[c]
            generator = torch_generator(config.seed, "train", round_idx, c)
            for _ in range(config.local_epochs):
                order = torch.randperm(shard.num_train, generator=generator)
                out.extend((shard.train_x, shard.train_y, order[s : s + config.batch_size])
                           for s in range(0, shard.num_train, config.batch_size))
        return out

    def pure_compute(work: list) -> None:
        for x, y, index in work:
            loss = nn.functional.cross_entropy(plain(x[index]), y[index])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                torch._foreach_add_(params, grads, alpha=-config.lr)

    def timed_round(round_idx: int) -> float:
        started = time.perf_counter()
        sim.run_round(strategy, round_idx)
        return time.perf_counter() - started

    def timed_compute(work: list) -> float:
        started = time.perf_counter()
        pure_compute(work)
        return time.perf_counter() - started

    round_times, compute_times, server_times, client_times = [], [], [], []
    try:
        for round_idx in range(settings.overhead_rounds + 1):  # round 0: warm-up
            work = batches(round_idx)
            phase.update(server=0.0, clients=0.0)
            # Each round is paired with its compute, back to back, in alternating order,
            # so that drifting load on the machine hits both sides alike.
            if round_idx % 2:
                round_s, compute_s = timed_round(round_idx), timed_compute(work)
            else:
                compute_s, round_s = timed_compute(work), timed_round(round_idx)
            if round_idx > 0:
                round_times.append(round_s)
                compute_times.append(compute_s)
                server_times.append(phase["server"])
                client_times.append(phase["clients"])
                log(f"round_overhead round {round_idx}: round {round_s * 1e3:.1f} ms, "
                    f"compute {compute_s * 1e3:.1f} ms")
    finally:
        simulation.fit_client = original_fit_client
    round_s, compute_s = statistics.median(round_times), statistics.median(compute_times)
    paired = [(r - c) / c for r, c in zip(round_times, compute_times)]
    return {
        "config": "pfedla.config.load_config() defaults: "
                  f"{config.dataset}, {config.clients} clients, participation {config.participation}, "
                  f"{config.model}, {config.local_epochs} epochs, batch {config.batch_size}",
        "algorithm": "pfedla",
        "steps_per_round": len(batches(1)),
        "rounds_measured": len(round_times),
        "round_s": round_s,
        "compute_s": compute_s,
        # median over rounds of (round - compute) / compute, each round paired with its own compute
        "overhead_fraction": statistics.median(paired),
        "overhead_fraction_of_medians": (round_s - compute_s) / compute_s,
        "server_s": statistics.median(server_times),
        "client_training_s": statistics.median(client_times),
        "client_overhead_fraction": (statistics.median(client_times) - compute_s) / compute_s,
        "round_times_s": round_times,
        "compute_times_s": compute_times,
    }


# --------------------------------------------------------------------------- scaling


def scaling_worker(spec: dict) -> dict:
    """Synthetic pFedLA with N clients at 10% participation: seconds per round, peak RSS."""
    import pfedla.simulation as simulation

    n, rounds = spec["clients"], spec["rounds"]
    config = config_from_dict({
        "dataset": "synthetic", "model": "mlp", "clients": n, "participation": 0.1,
        "algorithms": ["pfedla"], "device": "cpu",
    })
    data = build_federated_data(config)
    sim = simulation.Simulation(config, data, torch.device("cpu"), tracker=None, progress=False)
    strategy = make_strategy("pfedla", config, initial_layers(sim.model))
    assert isinstance(strategy, PFedLAStrategy)
    hn_bytes = sum(p.numel() * p.element_size() for p in strategy.hypernetworks.parameters())
    stack_bytes = sum(r.numel() * r.element_size() for r in strategy.models.rows)

    phase = {"server": 0.0}
    strategy.configure_fit = timed_into(strategy.configure_fit, phase, "server")  # type: ignore[method-assign]
    strategy.aggregate_fit = timed_into(strategy.aggregate_fit, phase, "server")  # type: ignore[method-assign]
    with PeakRss() as peak:
        sim.run_round(strategy, 0)  # warm-up
        times, server_times = [], []
        for round_idx in range(1, rounds + 1):
            phase["server"] = 0.0
            started = time.perf_counter()
            sim.run_round(strategy, round_idx)
            times.append(time.perf_counter() - started)
            server_times.append(phase["server"])
    return {
        "clients": n,
        "participants": len(simulation.participants(config, 1)),
        "round_s": statistics.median(times),
        "round_times_s": times,
        "server_s": statistics.median(server_times),
        "hn_params": hn_bytes // 4,
        "hn_param_mb": hn_bytes / MIB,
        "hn_with_adam_mb": 3 * hn_bytes / MIB,
        "model_stack_mb": stack_bytes / MIB,
        "peak_rss_mb": round(max(peak.peak_mib, peak.setup_peak_mib), 1),
        "round_peak_delta_mb": round(peak.delta_mib, 1),
        "embedding_dim": config.embedding_dim,
        "hidden_dim": config.hidden_dim,
    }


def bench_scaling(settings: Settings) -> dict:
    result: dict = {
        "config": "dataset=synthetic, model=mlp, participation=0.1, other keys at their defaults",
        "rounds_measured": settings.scaling_rounds,
        "peak_memory_method": "fresh subprocess per N; peak_rss_mb = ru_maxrss of the whole process "
                              "(imports, data, server state, 1 warm-up + measured rounds); "
                              "round_peak_delta_mb = peak during the rounds above the RSS after setup",
    }
    for n in settings.scaling_clients:
        log(f"scaling N={n}: 1 warm-up + {settings.scaling_rounds} round(s) in a fresh process")
        measured = run_worker({"kind": "scaling", "clients": n, "rounds": settings.scaling_rounds})
        result[str(n)] = measured
        log(f"  {measured['round_s']:.3f} s/round (server {measured['server_s']:.3f} s), "
            f"peak RSS {measured['peak_rss_mb']:.0f} MiB, HN params {measured['hn_param_mb']:.1f} MiB")
    result["fits_8gib"] = all(result[str(n)]["peak_rss_mb"] < 8 * 1024 for n in settings.scaling_clients)
    plot_scaling(result, settings.scaling_clients, RESULTS_DIR / "scaling.png")
    result["plot"] = "benchmarks/results/scaling.png"
    return result


def plot_scaling(result: dict, clients: Sequence[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [result[str(n)] for n in clients]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(clients, [r["round_s"] for r in rows], "o-", label="round")
    left.plot(clients, [r["server_s"] for r in rows], "s--", label="server (configure + aggregate)")
    left.set(xscale="log", yscale="log", xlabel="clients N (10% per round)", ylabel="seconds per round",
             title="time per round (median)")
    left.legend()
    right.plot(clients, [r["peak_rss_mb"] for r in rows], "o-", label="peak RSS")
    right.plot(clients, [r["hn_with_adam_mb"] for r in rows], "s--", label="HN params + Adam state")
    right.axhline(8 * 1024, color="red", linestyle=":", label="8 GiB")
    right.set(xscale="log", yscale="log", xlabel="clients N (10% per round)", ylabel="MiB",
              title="memory")
    right.legend()
    fig.suptitle("pFedLA on synthetic data (MLP), CPU, 2 threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- report

def bench_pipeline_overhead(settings: Settings) -> dict:
    """kfp.local run of the pipeline vs the same steps called in-process, and vs pure training."""
    import builtins
    import json
    import tempfile

    from pfedla import steps
    from pfedla.config import config_from_dict
    from pfedla_pipelines.runner import run_local

    rounds, clients = (1, 3) if settings.quick else (2, 4)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = config_from_dict({"clients": clients, "rounds": rounds, "device": "cpu",
                                   "algorithms": ["pfedla"], "output_dir": str(root / "out"),
                                   "pipeline": {"data_root": str(root / "plane")}})
        cfg = json.dumps(config.to_dict())
        log(f"pipeline_overhead: {rounds} round(s), {clients} clients in-process")
        started = time.perf_counter()
        training = 0.0
        shards, plan = root / "shards", root / "plan0"
        steps.partition(cfg, shards)
        steps.server_init(cfg, shards, plan)
        for round_idx in range(rounds):
            updates = []
            for client in range(clients):
                updates.append(root / f"u{round_idx}_{client}")
                began = time.perf_counter()
                steps.client_train(cfg, str(client), plan, updates[-1])
                training += time.perf_counter() - began
            steps.server_round(cfg, round_idx, round_idx + 1 < rounds, shards, plan, updates,
                               root / f"plan{round_idx + 1}")
            plan = root / f"plan{round_idx + 1}"
        steps.evaluate(cfg, shards, plan, root / "final", root / "evaluation", final=True)
        steps.checkpoint(cfg, root / "final", root / "checkpoint")
        in_process = time.perf_counter() - started
        tasks = 5 + rounds * (1 + clients)  # partition, init, evaluate, checkpoint, record + per round
        log(f"pipeline_overhead: the same {tasks} tasks through kfp.local")
        original_print = builtins.print
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        started = time.perf_counter()
        try:
            run_local(replace_data_root(config, root / "plane-kfp"), root / "kfp")
        finally:
            builtins.print = original_print
        local_s = time.perf_counter() - started
    return {
        "rounds": rounds, "clients": clients, "tasks": tasks,
        "kfp_local_s": local_s, "in_process_steps_s": in_process, "training_s": training,
        "orchestration_s_per_task": (local_s - in_process) / tasks,
        "share_outside_training": 1 - training / local_s,
        "note": "kfp.local starts a Python process per task (imports torch and pfedla each time); "
                "in_process_steps_s excludes the record step's MLflow logging",
    }


def replace_data_root(config: ExperimentConfig, data_root: Path) -> ExperimentConfig:
    from dataclasses import replace

    return replace(config, pipeline=replace(config.pipeline, data_root=str(data_root)))


# --------------------------------------------------------------------------- data movement

# CIFAR-10 split over 30 clients: 2,000 images each (60,000 in all), 3x32x32 float32 as pfedla stores them.
MOVEMENT_CLIENTS = 30
MOVEMENT_IMAGES_PER_CLIENT = 2000


def data_movement_worker(spec: dict) -> dict:
    """One round of the pipeline's real steps over a local data plane, in a fresh process.

    Two things are stand-ins, since only sizes matter here: the data (random CIFAR-10-shaped
    tensors; nothing to download) and the local training (an update of the right shapes instead
    of SGD: update bytes depend on shapes, not values). The model is the paper CNN.
    """
    from pfedla import steps
    from pfedla.data import ClientShard, FederatedData
    from pfedla.steps import round_traffic
    from pfedla_pipelines.runner import step_manifests

    clients, per_client = spec["clients"], spec["images_per_client"]
    test = per_client // 4  # test_fraction 0.25

    def cifar_like(config):
        generator = torch.Generator().manual_seed(0)
        shards = []
        for _ in range(clients):
            x = torch.rand(per_client, 3, 32, 32, generator=generator)
            y = torch.randint(0, 10, (per_client,), generator=generator)
            shards.append(ClientShard(x[test:], y[test:], x[:test], y[:test]))
        return FederatedData(shards, 10, (3, 32, 32))

    def paper_cnn(name, input_shape, num_classes, seed):
        torch.manual_seed(seed)
        return CNN(3, 32, 10, width=spec["width"], hidden=spec["hidden"])

    def same_shaped_update(trainer, instruction, train, config, round_idx, client_id):
        delta = [torch.full_like(layer, 1e-4) for layer in instruction.layers]
        return ClientUpdate(client_id, len(train[1]), delta, 1.0)

    steps.build_federated_data, steps.build_model = cifar_like, paper_cnn
    steps.fit_client = same_shaped_update
    root = Path(spec["root"])
    config = config_from_dict({"clients": clients, "participation": spec["participation"], "rounds": 2,
                               "device": "cpu", "pipeline": {"data_root": str(root / "plane")}})
    cfg = json.dumps(config.to_dict())
    out = root / "out"  # manifests named after the component outputs, as step_manifests expects
    shards_manifest, plan_manifest = out / "partition" / "shards", out / "server-init" / "plan"
    steps.partition(cfg, shards_manifest)
    steps.server_init(cfg, shards_manifest, plan_manifest)
    selected = sorted(json.loads(plan_manifest.read_text())["clients"], key=int)
    reports = []
    for client in selected:  # one client per pod
        reports.append(out / f"client-train-{client}" / "update")
        steps.client_train(cfg, client, plan_manifest, reports[-1])
    steps.server_round(cfg, 0, True, shards_manifest, plan_manifest, reports,
                       out / "server-round" / "next_plan")
    manifests = step_manifests(root / "out")
    plan = next(m for m in manifests if m["step"] == "server_init")
    shards = next(m for m in manifests if m["step"] == "partition")
    sizes = {
        "state": plan["state"]["size"], "model": plan["clients"][selected[0]]["model"]["size"],
        "train": plan["clients"][selected[0]]["train"]["size"],
        "update": next(r["update"]["size"] for m in manifests if m["step"] == "client_train"
                       for r in m["clients"].values()),
        "all_shards": sum(e["size"] for e in shards["train"] + shards["test"]),
        "manifests": sum(len(json.dumps(m)) for m in manifests
                         if m["step"] in ("client_train", "server_round")),
    }
    clients_moved = [m["transfers"]["read_bytes"] + m["transfers"]["written_bytes"]
                     for m in manifests if m["step"] == "client_train"]
    return {"selected": len(selected), "sizes": sizes, "after": round_traffic(manifests, 0),
            "client_pod_bytes": max(clients_moved)}


def bytes_before(sizes: dict, selected: int) -> dict:
    """One round under the earlier layout (whole artifacts downloaded by KFP's launcher), same objects.

    server-configure: shards + state in, S start models out; each client pod: shards + all S start
    models in, its update out; server-aggregate: shards + state + S updates in, state out.
    """
    shards, state, model, update = sizes["all_shards"], sizes["state"], sizes["model"], sizes["update"]
    configure = shards + state + selected * model
    client_pod = shards + selected * model + update
    aggregate = shards + state + selected * update + state
    return {"moved_bytes": configure + selected * client_pod + aggregate, "client_pod_bytes": client_pod}


def bench_data_movement(settings: Settings) -> dict:
    """Bytes per round through object storage: the data plane (measured) vs the earlier layout (derived)."""
    model = dict(settings.server_model)
    result: dict = {"clients": MOVEMENT_CLIENTS, "images_per_client": MOVEMENT_IMAGES_PER_CLIENT,
                    "model": f"CNN(3, 32, 10, width={model['width']}, hidden={model['hidden']})",
                    "least": "clients: start model + train split in, update out; server: state + history "
                             "in and out, updates in, next round's start models out"}
    for participation in (0.5, 1.0):
        with tempfile.TemporaryDirectory() as tmp:
            log(f"data_movement: N={MOVEMENT_CLIENTS}, participation {participation} (real steps, one round)")
            measured = run_worker({"kind": "data_movement", "clients": MOVEMENT_CLIENTS,
                                   "images_per_client": MOVEMENT_IMAGES_PER_CLIENT,
                                   "participation": participation, "root": tmp, **model})
        before = bytes_before(measured["sizes"], measured["selected"])
        after = measured["after"]
        result[str(measured["selected"])] = {
            **measured, "before": before,
            "reduction": before["moved_bytes"] / after["moved_bytes"],
            "client_pod_reduction": before["client_pod_bytes"] / measured["client_pod_bytes"],
        }
    return result


SECTIONS: dict[str, Callable[[Settings], dict]] = {
    "server_step": bench_server_step,
    "round_overhead": bench_round_overhead,
    "scaling": bench_scaling,
    "pipeline_overhead": bench_pipeline_overhead,
    "data_movement": bench_data_movement,
}

WORKERS: dict[str, Callable[[dict], dict]] = {
    "server_step": server_step_worker,
    "scaling": scaling_worker,
    "data_movement": data_movement_worker,
}


def format_table(results: dict) -> str:
    lines = []
    step = results.get("server_step")
    if step:
        lines += [
            f"server step: {step['params']:,}-parameter CNN, all N clients, median wall time; "
            "peak = RSS above setup (MiB)",
            f"{'N':>6}{'ours s':>10}{'naive s':>10}{'speedup':>9}{'ours MiB':>10}{'naive MiB':>11}"
            f"{'naive/ours':>12}",
        ]
        for key, row in step.items():
            if key.isdigit():
                lines.append(f"{key:>6}{row['ours_s']:>10.2f}{row['naive_s']:>10.2f}{row['speedup']:>8.1f}x"
                             f"{row['ours_peak_mb']:>10.0f}{row['naive_peak_mb']:>11.0f}"
                             f"{row['memory_ratio']:>11.2f}x")
        lines.append("")
    overhead = results.get("round_overhead")
    if overhead:
        ms = {k: 1e3 * overhead[k] for k in ("round_s", "compute_s", "server_s", "client_training_s")}
        lines += [
            f"round overhead: {overhead['config']} ({overhead['steps_per_round']} SGD steps/round)",
            f"  round {ms['round_s']:.1f} ms, pure compute {ms['compute_s']:.1f} ms "
            f"-> overhead {100 * overhead['overhead_fraction']:.1f}%",
            f"  of the round: server {ms['server_s']:.1f} ms, "
            f"client training {ms['client_training_s']:.1f} ms "
            f"({100 * overhead['client_overhead_fraction']:.1f}% above pure compute)",
            "",
        ]
    scaling = results.get("scaling")
    if scaling:
        lines += [
            "scaling: synthetic + MLP, 10% participation, median s/round; peak = whole-process RSS",
            f"{'N':>6}{'s/round':>10}{'server s':>10}{'peak MiB':>10}{'HN MiB':>9}{'HN+Adam MiB':>13}",
        ]
        for key, row in scaling.items():
            if key.isdigit():
                lines.append(f"{key:>6}{row['round_s']:>10.3f}{row['server_s']:>10.3f}"
                             f"{row['peak_rss_mb']:>10.0f}{row['hn_param_mb']:>9.1f}"
                             f"{row['hn_with_adam_mb']:>13.1f}")
        lines.append("")
    pipeline = results.get("pipeline_overhead")
    if pipeline:
        lines += [
            f"pipeline overhead: {pipeline['tasks']} tasks ({pipeline['rounds']} round(s), "
            f"{pipeline['clients']} clients) under kfp.local {pipeline['kfp_local_s']:.1f} s, "
            f"same steps in-process {pipeline['in_process_steps_s']:.1f} s",
            f"  orchestration {pipeline['orchestration_s_per_task']:.2f} s per task; "
            f"{100 * pipeline['share_outside_training']:.0f}% of the local run is spent outside training",
            "",
        ]
    movement = results.get("data_movement")
    if movement:
        gb = 1e9
        lines += [
            f"data movement per round: N={movement['clients']}, {movement['model']}, "
            f"{movement['images_per_client']} CIFAR-10-sized images per client; GB = 1e9 bytes",
            f"{'S':>4}{'before GB':>11}{'after GB':>10}{'least GB':>10}{'after/least':>13}{'reduction':>11}"
            f"{'pod before GB':>15}{'pod after GB':>14}",
        ]
        for key, row in movement.items():
            if key.isdigit():
                after = row["after"]
                before = row["before"]
                lines.append(f"{key:>4}{before['moved_bytes'] / gb:>11.2f}{after['moved_bytes'] / gb:>10.2f}"
                             f"{after['least_bytes'] / gb:>10.2f}{after['ratio']:>12.3f}x"
                             f"{row['reduction']:>10.1f}x{before['client_pod_bytes'] / gb:>15.3f}"
                             f"{row['client_pod_bytes'] / gb:>14.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and rounds (a few minutes)")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append",
                        help="run only these sections (repeatable)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)

    if args.worker:
        spec = json.loads(args.worker)
        Path(args.out).write_text(json.dumps(WORKERS[spec["kind"]](spec)))
        return 0

    settings = Settings.make(args.quick)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict = {
        "meta": {
            "mode": "quick" if settings.quick else "full",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": THREADS,
            "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
            "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "loadavg_start": os.getloadavg(),  # other work on the machine skews timings
        }
    }
    for name, bench in SECTIONS.items():
        if args.only and name not in args.only:
            continue
        log(f"== {name}")
        section_started = time.perf_counter()
        results[name] = bench(settings)
        results[name]["section_seconds"] = time.perf_counter() - section_started
    results["meta"]["total_seconds"] = time.perf_counter() - started
    results["meta"]["loadavg_end"] = os.getloadavg()
    out = RESULTS_DIR / "latest.json"
    out.write_text(json.dumps(results, indent=2))
    print()
    print(format_table(results))
    print(f"\nwritten {out} in {results['meta']['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
