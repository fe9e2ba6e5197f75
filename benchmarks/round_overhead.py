"""round_overhead: one default simulation round against the pure compute it contains.

The round runs ``Simulation.run_round`` with the pfedla strategy on the default config; the
pure compute is the same forward/backward passes and SGD steps on the same batches with a plain
``nn.Module`` in a tight loop. The difference is what the library adds around training.
"""

from __future__ import annotations

import statistics
import time

import torch
from common import Settings, log, timed_into
from torch import nn

from pfedla.config import load_config
from pfedla.data import build_federated_data
from pfedla.models import build_model
from pfedla.seeding import torch_generator


def bench(settings: Settings) -> dict:
    """A default simulation round (pfedla) vs the same forward/backward/SGD steps in a tight loop."""
    import pfedla.rounds as rounds
    import pfedla.simulation as simulation

    config = load_config()
    device = torch.device("cpu")
    data = build_federated_data(config)
    sim = simulation.Simulation(config, data, device, tracker=None, progress=False)
    strategy, states = sim.start("pfedla")

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
        for c in rounds.participants(config, round_idx):
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
        sim.run_round(strategy, states, round_idx)
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


def table(result: dict) -> list[str]:
    """The section's lines of the printed table, ending with a blank separator line."""
    ms = {k: 1e3 * result[k] for k in ("round_s", "compute_s", "server_s", "client_training_s")}
    return [
        f"round overhead: {result['config']} ({result['steps_per_round']} SGD steps/round)",
        f"  round {ms['round_s']:.1f} ms, pure compute {ms['compute_s']:.1f} ms "
        f"-> overhead {100 * result['overhead_fraction']:.1f}%",
        f"  of the round: server {ms['server_s']:.1f} ms, "
        f"client training {ms['client_training_s']:.1f} ms "
        f"({100 * result['client_overhead_fraction']:.1f}% above pure compute)",
        "",
    ]
