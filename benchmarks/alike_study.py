#!/usr/bin/env python
"""pFedLA where clients are alike (issue 13): four splits x seeds, pfedla against fedavg and local.

    python benchmarks/alike_study.py [--config configs/mnist-comparison.yaml] [--data-dir DIR]
        [--splits iid dir0.5 dir0.1 path2] [--seeds 0 1 2] [--algorithms pfedla fedavg local]
        [--json out.json] [key=value ...]

Every (split, seed) builds its federated data once and runs each algorithm on it in-process
(no MLflow, no checkpoints). It prints, per split, each seed's final accuracy (sample-weighted
mean and client mean) and their mean over the seeds, the bar of the issue (pfedla at least
max(fedavg, local) - 0.5 points, on the seed means of the sample-weighted accuracy), and for
pfedla how α moved: the seed-mean self-weight α_ii per layer, the entropy of α and the share of
α entries at the floor (below 1e-9), after selected rounds. docs/study.md holds the findings.
One thread: other work shares the machine, and timings stay comparable.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads OpenMP
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from common import SPLITS  # noqa: E402

from pfedla.algorithms.pfedla import PFedLAStrategy  # noqa: E402
from pfedla.config import load_config  # noqa: E402
from pfedla.data.federated import build_federated_data  # noqa: E402
from pfedla.simulation import Simulation, accuracy_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BAR_POINTS = 0.5  # pfedla must reach max(fedavg, local) minus this many accuracy points
FLOOR = 1e-9  # an α entry below this is at the floor: a ReLU head at or below zero


def alpha_trace(alpha: torch.Tensor) -> dict[str, list[float] | float]:
    """What α [N, L, N] looks like: mean self-weight per layer, mean entropy, share at the floor."""
    n = alpha.shape[0]
    own = alpha[torch.arange(n), :, torch.arange(n)]  # [N, L]
    entropy = -(alpha * alpha.clamp_min(1e-12).log()).sum(-1)
    return {"self_weight": own.mean(0).tolist(), "entropy": float(entropy.mean()),
            "at_floor": float((alpha < FLOOR).float().mean())}


def run_algorithm(simulation: Simulation, name: str) -> dict:
    """All rounds of one algorithm: final accuracies, seconds, and α after every round (pfedla)."""
    config = simulation.config
    strategy, states = simulation.start(name)
    started, trace = time.perf_counter(), []
    for round_idx in range(config.rounds):
        simulation.run_round(strategy, states, round_idx)
        if isinstance(strategy, PFedLAStrategy):
            trace.append(alpha_trace(strategy.layer_weights()))
    metrics = accuracy_metrics(simulation.evaluate(strategy, states, config.rounds)[1])
    return {"accuracy": metrics["accuracy_mean"], "client_mean": metrics["accuracy_client_mean"],
            "seconds": time.perf_counter() - started, "alpha": trace}


def run_split(split: list[str], seed: int, algorithms: list[str], config_path: Path,
              overrides: list[str]) -> dict[str, dict]:
    """Every algorithm on one split and seed, sharing the federated data."""
    config = load_config(config_path, [*overrides, *split, f"seed={seed}", "device=cpu",
                                       f"algorithms={json.dumps(algorithms)}"])
    simulation = Simulation(config, build_federated_data(config), torch.device("cpu"), tracker=None,
                            progress=False)
    return {name: run_algorithm(simulation, name) for name in algorithms}


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


def split_lines(split: str, runs: dict[int, dict[str, dict]], algorithms: list[str],
                alpha_rounds: list[int]) -> list[str]:
    """The printed table of one split: per seed, the seed mean, the bar, and α's trace."""
    lines = [f"== {split}  (accuracy % sample-weighted / client mean; seconds per run)"]
    lines.append("seed  " + "".join(f"{name:>24}" for name in algorithms))
    for seed, result in runs.items():
        cells = "".join(f"{100 * r['accuracy']:>10.2f} /{100 * r['client_mean']:6.2f} {r['seconds']:4.0f}s"
                        for r in (result[name] for name in algorithms))
        lines.append(f"{seed:<6}{cells}")
    means = {name: mean([r[name]["accuracy"] for r in runs.values()]) for name in algorithms}
    client = {name: mean([r[name]["client_mean"] for r in runs.values()]) for name in algorithms}
    lines.append("mean  " + "".join(f"{100 * means[n]:>10.2f} /{100 * client[n]:6.2f}{'':6}"
                                    for n in algorithms))
    baselines = [n for n in ("fedavg", "local") if n in algorithms]
    if "pfedla" in algorithms and baselines:
        best = max(means[n] for n in baselines)
        gap = 100 * (means["pfedla"] - best)
        verdict = "meets" if gap >= -BAR_POINTS else "MISSES"
        lines.append(f"bar: pfedla - max({', '.join(baselines)}) = {gap:+.2f} points: {verdict} the "
                     f"-{BAR_POINTS} bar")
    if "pfedla" in algorithms:
        traces = [r["pfedla"]["alpha"] for r in runs.values()]
        lines.append("pfedla α (seed mean): round  self-weight per layer  entropy  at-floor share")
        for round_no in [r for r in alpha_rounds if r <= len(traces[0])]:
            points = [t[round_no - 1] for t in traces]
            own = [mean([p["self_weight"][layer] for p in points])
                   for layer in range(len(points[0]["self_weight"]))]
            lines.append(f"  {round_no:>4}  " + " ".join(f"{w:.3f}" for w in own)
                         + f"   {mean([p['entropy'] for p in points]):.3f}"
                         + f"   {mean([p['at_floor'] for p in points]):.3f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "mnist-comparison.yaml")
    parser.add_argument("--data-dir", help="overrides the config's data_dir")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--algorithms", nargs="+", default=["pfedla", "fedavg", "local"])
    parser.add_argument("--alpha-rounds", nargs="+", type=int, default=[1, 2, 3, 5, 10, 15, 20, 25, 30, 40])
    parser.add_argument("--json", type=Path, help="also write every number (α after each round) here")
    parser.add_argument("overrides", nargs="*", help="config key=value, applied before the split's keys")
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = list(args.overrides) + ([f"data_dir={args.data_dir}"] if args.data_dir else [])
    base = load_config(args.config, overrides)
    print(f"config {args.config.name} {' '.join(overrides)}: model {base.model}, {base.clients} clients, "
          f"{base.rounds} rounds, E={base.local_epochs}, pfedla.hn_lr={base.settings_of('pfedla').hn_lr}",
          flush=True)
    everything: dict[str, dict[int, dict]] = {}
    for split in args.splits:
        everything[split] = {seed: run_split(SPLITS[split], seed, args.algorithms, args.config, overrides)
                             for seed in args.seeds}
        lines = split_lines(split, everything[split], args.algorithms, args.alpha_rounds)
        print("\n".join(lines), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"config": str(args.config), "overrides": overrides,
                                         "results": everything}, indent=1))


if __name__ == "__main__":
    main()
