"""scaling: synthetic data with the MLP at N = 10, 100, 1000 clients, 10% participation.

One fresh process per N (``worker``) measures the time per round, the server's share of it and
the peak RSS; ``plot_scaling`` draws results/scaling.png.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from common import MIB, PeakRss, Settings, log, measured_sizes, run_worker, timed_into

from pfedla.algorithms.pfedla import PFedLAStrategy
from pfedla.config import config_from_dict
from pfedla.data import build_federated_data


def worker(spec: dict) -> dict:
    """Synthetic pFedLA with N clients at 10% participation: seconds per round, peak RSS."""
    import pfedla.simulation as simulation
    from pfedla.rounds import participants

    n, rounds = spec["clients"], spec["rounds"]
    config = config_from_dict({
        "dataset": "synthetic", "model": "mlp", "clients": n, "participation": 0.1,
        "algorithms": ["pfedla"], "device": "cpu",
    })
    data = build_federated_data(config)
    sim = simulation.Simulation(config, data, torch.device("cpu"), tracker=None, progress=False)
    strategy, states = sim.start("pfedla")
    assert isinstance(strategy, PFedLAStrategy)
    hn_bytes = sum(p.numel() * p.element_size() for p in strategy.hypernetworks.parameters())
    stack_bytes = sum(r.numel() * r.element_size() for r in strategy.models.rows)

    phase = {"server": 0.0}
    strategy.configure_fit = timed_into(strategy.configure_fit, phase, "server")  # type: ignore[method-assign]
    strategy.aggregate_fit = timed_into(strategy.aggregate_fit, phase, "server")  # type: ignore[method-assign]
    with PeakRss() as peak:
        sim.run_round(strategy, states, 0)  # warm-up
        times, server_times = [], []
        for round_idx in range(1, rounds + 1):
            phase["server"] = 0.0
            started = time.perf_counter()
            sim.run_round(strategy, states, round_idx)
            times.append(time.perf_counter() - started)
            server_times.append(phase["server"])
    return {
        "clients": n,
        "participants": len(participants(config, 1)),
        "round_s": statistics.median(times),
        "round_times_s": times,
        "server_s": statistics.median(server_times),
        "hn_params": hn_bytes // 4,
        "hn_param_mb": hn_bytes / MIB,
        "hn_with_grad_mb": 2 * hn_bytes / MIB,
        "model_stack_mb": stack_bytes / MIB,
        "peak_rss_mb": round(max(peak.peak_mib, peak.setup_peak_mib), 1),
        "round_peak_delta_mb": round(peak.delta_mib, 1),
        "embedding_dim": config.settings_of("pfedla").embedding_dim,
        "hidden_dim": config.settings_of("pfedla").hidden_dim,
    }


def bench(settings: Settings) -> dict:
    """Each N in a fresh process, then the plot of time and memory against N."""
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
    plot_scaling(result, settings.scaling_clients, settings.results_dir / "scaling.png")
    result["plot"] = "benchmarks/results/scaling.png"
    return result


def plot_scaling(result: dict, clients: Sequence[int], path: Path) -> None:
    """Time per round and memory against N, log-log, saved to ``path``."""
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
    right.plot(clients, [r["hn_with_grad_mb"] for r in rows], "s--", label="HN params + gradient")
    right.axhline(8 * 1024, color="red", linestyle=":", label="8 GiB")
    right.set(xscale="log", yscale="log", xlabel="clients N (10% per round)", ylabel="MiB",
              title="memory")
    right.legend()
    fig.suptitle("pFedLA on synthetic data (MLP), CPU, 2 threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(result: dict) -> list[str]:
    """The section's lines of the printed table, ending with a blank separator line."""
    lines = [
        "scaling: synthetic + MLP, 10% participation, median s/round; peak = whole-process RSS",
        f"{'N':>6}{'s/round':>10}{'server s':>10}{'peak MiB':>10}{'HN MiB':>9}{'HN+grad MiB':>13}",
    ]
    for key, row in measured_sizes(result):
        lines.append(f"{key:>6}{row['round_s']:>10.3f}{row['server_s']:>10.3f}"
                     f"{row['peak_rss_mb']:>10.0f}{row['hn_param_mb']:>9.1f}"
                     f"{row['hn_with_grad_mb']:>13.1f}")
    lines.append("")
    return lines
