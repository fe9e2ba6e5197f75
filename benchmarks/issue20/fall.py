#!/usr/bin/env python
"""Issue 20, done-when 3: the one-round fall of a client's accuracy.

    python benchmarks/issue20/fall.py [--algorithms pfedla local fedavg] [key=value ...]

Defaults reproduce the issue's case: MNIST 10k, model=cnn, 10 clients, pathological 2 classes,
25 rounds, E=1, seed 7. Prints per algorithm the final sample/client mean, the worst one-round
fall of any client (points, round, client) and the per-round client-mean curve.
"""

from __future__ import annotations

import argparse

from lab import SPLITS, fmean, parse_variant, run, simulation, worst_drop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algorithms", nargs="+", default=["pfedla", "local"])
    parser.add_argument("--split", default="path2")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = ["model=cnn", "rounds=25", "local_epochs=1", "seed=7", "seeds=null", *SPLITS[args.split]]
    sim = simulation([*base, *args.overrides])
    print(f"fall: {' '.join(base + args.overrides)}")
    for spec in args.algorithms:
        name, algorithm, settings = parse_variant(spec)
        result = run(sim, algorithm, every_round=True, **settings)
        drop, rnd, client = worst_drop(result["per_round"])
        curve = " ".join(f"{100 * fmean(r):.1f}" for r in result["per_round"])
        print(f"{name:<10} final {100 * result['accuracy']:.2f} / {100 * result['client_mean']:.2f}  "
              f"worst fall {drop:.1f} pts (round {rnd}, client {client})  {result['seconds']:.0f}s",
              flush=True)
        print(f"  client-mean per round: {curve}")
        print(f"  final clients: {' '.join(f'{100 * a:.1f}' for a in result['clients'])}", flush=True)


if __name__ == "__main__":
    main()
