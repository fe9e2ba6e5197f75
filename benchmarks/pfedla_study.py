#!/usr/bin/env python
"""pFedLA and its variants against the baselines (issue 20): splits x seeds on one config, in-process.

    python benchmarks/pfedla_study.py --data-dir ../shared/data/mnist \\
        --variants pfedla pfedla_paper 'relu=pfedla:pfedla.heads=relu' fedavg local fedrep \\
        [--splits iid dir0.5 dir0.1 path2] [--seeds 0 1 2] [--falls] [--cache FILE] [key=value ...]

A variant is ``label=algorithm:key=value,key=value`` (label and overrides optional): a registered
algorithm run with those config overrides (``pfedla.step=plain``, ``last_batch=mean``); the override
``schedule=sequential`` runs the round as the public pFedLA code does, clients one after another,
each starting from a θ̄ that holds the earlier clients' updates of the round (a driver-level
measurement, not a setting: the pipeline trains a round's clients in parallel). Trailing
``key=value`` apply to every variant (``rounds=100 local_epochs=2``).

Prints per split each variant's seed means of the test-sample-weighted and the client-mean accuracy,
``bar``: its sample mean minus max(fedavg, local) (the issue's bar: >= -0.5), ``front``: its client
mean minus the best client mean of fedrep, fedper, pfedhn and ditto among the variants (issue 20's
frontier: >= -0.3), the per-seed sample means, α's mean self-weight per layer after --alpha-rounds,
and with --falls (every round evaluated) the largest one-round fall of any client's accuracy, over
the run and over its last --final-rounds rounds (what a user deploying the final models meets).
Finished (split, seed, variant) runs are kept in --cache, so a rerun computes only what is new.
One torch thread: the machine is shared and timings stay comparable.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads OpenMP
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from common import SPLITS  # noqa: E402

from pfedla.algorithms.pfedla import PFedLAStrategy  # noqa: E402
from pfedla.config import ExperimentConfig, load_config  # noqa: E402
from pfedla.data.federated import FederatedData, build_federated_data  # noqa: E402
from pfedla.rounds import close_round, participants  # noqa: E402
from pfedla.simulation import Simulation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BAR = ("fedavg", "local")  # pFedLA >= max of these - 0.5 (sample mean)
FRONTIER = ("fedrep", "fedper", "pfedhn", "ditto")  # pFedLA >= best of these - 0.3 (client mean)


@dataclass(frozen=True)
class Variant:
    """One line of the table: a registered algorithm with config overrides."""

    label: str
    algorithm: str
    overrides: tuple[str, ...]
    sequential: bool = False

    @classmethod
    def parse(cls, spec: str) -> Variant:
        head, _, rest = spec.partition(":")
        label, _, algorithm = head.partition("=") if "=" in head else (head, "", head)
        overrides = tuple(item for item in rest.split(",") if item)
        sequential = "schedule=sequential" in overrides
        return cls(label, algorithm, tuple(o for o in overrides if o != "schedule=sequential"), sequential)

    def config(self, config_path: Path, common: list[str], split: str, seed: int) -> ExperimentConfig:
        """The run's whole config: the file, the common overrides, the split, the seed, its own."""
        return load_config(config_path, [*common, *SPLITS[split], f"seed={seed}", "seeds=null", "device=cpu",
                                         f"algorithms=[{self.algorithm}]", *self.overrides])

    def key(self, config: ExperimentConfig, falls: bool) -> str:
        """The cache key: the resolved config (so a changed default is a new run), schedule, falls."""
        return json.dumps([config.to_json(), self.algorithm, self.sequential, falls])


def self_weights(strategy) -> list[float] | None:
    """pFedLA's mean self-weight α_ii per layer, None for other algorithms."""
    if not isinstance(strategy, PFedLAStrategy):
        return None
    alpha = strategy.layer_weights()
    n = alpha.shape[0]
    return alpha[torch.arange(n), :, torch.arange(n)].mean(0).tolist()


def sequential_round(simulation: Simulation, strategy, states, round_idx: int) -> None:
    """The public pFedLA code's round: each client in turn is configured from the current server
    state, trains, and is aggregated before the next one starts."""
    for client in participants(simulation.config, round_idx):
        instructions = strategy.configure_fit(round_idx, [client])
        delivered, failed = simulation.fit_clients(strategy, instructions, states, round_idx)
        close_round(strategy, simulation.config, round_idx, delivered, failed, 0.0)


def run_variant(variant: Variant, config: ExperimentConfig, data: FederatedData, falls: bool) -> dict:
    """All rounds of one variant on the (split, seed) data: final accuracies, α's trace, and with
    ``falls`` every client's accuracy after every round."""
    simulation = Simulation(config, data, torch.device("cpu"), tracker=None, progress=False)
    strategy, states = simulation.start(variant.algorithm)
    started, trace, per_round = time.perf_counter(), [], []
    for round_idx in range(config.rounds):
        if variant.sequential:
            sequential_round(simulation, strategy, states, round_idx)
        else:
            simulation.run_round(strategy, states, round_idx)
        trace.append(self_weights(strategy))
        if falls or round_idx == config.rounds - 1:
            per_round.append([r.accuracy for r in simulation.evaluate(strategy, states, round_idx + 1)[1]])
    results = simulation.evaluate(strategy, states, config.rounds)[1]
    total = sum(r.count for r in results)
    return {"accuracy": sum(r.correct for r in results) / total,
            "client_mean": statistics.fmean(r.accuracy for r in results),
            "clients": per_round[-1], "seconds": time.perf_counter() - started,
            "alpha": trace if trace[0] is not None else None, "per_round": per_round if falls else None}


def worst_fall(per_round: list[list[float]], first: int = 1) -> tuple[float, int, int]:
    """The largest one-round fall of any client's accuracy, in points, from round ``first`` (1-based)
    on: (points, round, client)."""
    worst = (0.0, 0, -1)
    for index in range(max(first, 2) - 1, len(per_round)):
        for client, (before, after) in enumerate(zip(per_round[index - 1], per_round[index], strict=True)):
            if 100 * (before - after) > worst[0]:
                worst = (100 * (before - after), index + 1, client)
    return worst


def mean(values) -> float:
    return statistics.fmean(values)


def split_lines(split: str, results: dict[str, dict[int, dict]], args: argparse.Namespace) -> list[str]:
    """The printed table of one split."""
    means = {label: (mean(r["accuracy"] for r in runs.values()),
                     mean(r["client_mean"] for r in runs.values())) for label, runs in results.items()}
    algorithm = {v.label: v.algorithm for v in args.variants}
    bar = [means[v.label][0] for v in args.variants if v.label == v.algorithm and v.algorithm in BAR]
    front = {v.label: means[v.label][1] for v in args.variants
             if v.label == v.algorithm and v.algorithm in FRONTIER}
    lines = [f"== {split} (seeds {' '.join(map(str, args.seeds))}; accuracy % sample-weighted / client mean, "
             f"seed means; bar: sample - max({', '.join(b for b in BAR if b in algorithm.values())}); "
             f"front: client - best of {', '.join(front) or '(none run)'})"]
    for label, runs in results.items():
        sample, client = means[label]
        cells = f"{label:<24}{100 * sample:7.2f} /{100 * client:6.2f}"
        if bar:
            cells += f"  bar {100 * (sample - max(bar)):+6.2f}"
        if front:
            cells += f"  front {100 * (client - max(front.values())):+6.2f}"
        cells += "  seeds " + " ".join(f"{100 * r['accuracy']:.2f}" for r in runs.values())
        cells += f"  {mean(r['seconds'] for r in runs.values()):.0f}s/run"
        if args.falls:
            rounds = len(next(iter(runs.values()))["per_round"])
            whole = [worst_fall(r["per_round"]) for r in runs.values()]
            final = [worst_fall(r["per_round"], rounds - args.final_rounds + 1) for r in runs.values()]
            cells += ("  worst fall " + " ".join(f"{f[0]:.1f}@r{f[1]}" for f in whole)
                      + f"; last {args.final_rounds} rounds " + " ".join(f"{f[0]:.1f}" for f in final))
        traces = [r["alpha"] for r in runs.values() if r.get("alpha")]
        if traces:
            points = [n for n in args.alpha_rounds if n <= len(traces[0])]
            cells += "  α_ii " + " ".join(
                f"r{n}:" + "/".join(f"{mean(t[n - 1][layer] for t in traces):.2f}"
                                    for layer in range(len(traces[0][0]))) for n in points)
        lines.append(cells)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "mnist-comparison.yaml")
    parser.add_argument("--data-dir", help="overrides the config's data_dir")
    parser.add_argument("--variants", nargs="+", type=Variant.parse,
                        default=[Variant.parse(v) for v in ("pfedla", "fedavg", "local")])
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--alpha-rounds", nargs="*", type=int, default=[5, 10, 25, 50, 100])
    parser.add_argument("--falls", action="store_true", help="evaluate every round; print the worst falls")
    parser.add_argument("--final-rounds", type=int, default=5, help="with --falls: the last rounds' fall")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/pfedla-study-cache.json"))
    parser.add_argument("overrides", nargs="*", help="config key=value for every variant")
    args = parser.parse_args()
    torch.set_num_threads(1)
    common = list(args.overrides) + ([f"data_dir={args.data_dir}"] if args.data_dir else [])
    cache = json.loads(args.cache.read_text()) if args.cache.is_file() else {}
    print(f"pfedla_study {args.config.name} {' '.join(common)}", flush=True)
    for split in args.splits:
        results: dict[str, dict[int, dict]] = {v.label: {} for v in args.variants}
        for seed in args.seeds:
            data = None
            for variant in args.variants:
                config = variant.config(args.config, common, split, seed)
                key = variant.key(config, args.falls)
                if key not in cache:
                    if data is None:
                        data = build_federated_data(load_config(args.config, [*common, *SPLITS[split],
                                                                               f"seed={seed}", "seeds=null"]))
                    cache[key] = run_variant(variant, config, data, args.falls)
                    args.cache.write_text(json.dumps(cache))
                    run = cache[key]
                    print(f"  {split} seed {seed} {variant.label}: {100 * run['accuracy']:.2f} / "
                          f"{100 * run['client_mean']:.2f} ({run['seconds']:.0f}s)", flush=True)
                results[variant.label][seed] = cache[key]
        print("\n".join(split_lines(split, results, args)), flush=True)


if __name__ == "__main__":
    main()
