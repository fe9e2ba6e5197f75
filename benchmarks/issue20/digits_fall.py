#!/usr/bin/env python
"""Issue 20: look for one-round falls on the embedded digits default (fast cases for a test).

    python benchmarks/issue20/digits_fall.py [--algorithms pfedla local] [--seeds 0 1 2] [key=value ...]
"""
from __future__ import annotations

import argparse

from lab import parse_variant, run, simulation, worst_drop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algorithms", nargs="+", default=["pfedla", "local"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    for seed in args.seeds:
        sim = simulation(["dataset=digits", f"seed={seed}", "seeds=null", *args.overrides], config_path=None)
        for spec in args.algorithms:
            name, algorithm, settings = parse_variant(spec)
            result = run(sim, algorithm, every_round=True, **settings)
            drop, rnd, client = worst_drop(result["per_round"])
            print(f"seed {seed} {name:<8} final {100 * result['accuracy']:.2f} / {100 * result['client_mean']:.2f}"
                  f"  worst fall {drop:.1f} pts (round {rnd}, client {client})  {result['seconds']:.1f}s", flush=True)


if __name__ == "__main__":
    main()
