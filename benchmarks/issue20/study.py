#!/usr/bin/env python
"""Issue 20: pFedLA variants against baselines over splits and seeds (MLP comparison config).

    python benchmarks/issue20/study.py --variants pfedla 'p2=pfedla:hn_lr=2' fedavg local \\
        [--splits iid dir0.5 dir0.1 path2] [--seeds 0 1 2] [--cache base.json] [key=value ...]

A variant is ``label=algorithm:key=value,...`` (prototype settings of PFedLAStrategy, plus
``sequential=true`` for the clients-one-after-another schedule). Registered algorithms without
settings (fedavg, local, fedrep...) are cached in --cache by (split, seed, overrides), so that
reruns only train the variants. Prints per split: each variant's seed means (sample-weighted /
client mean), its gap to max(fedavg, local) and to the best of the --frontier algorithms present,
the worst one-round fall with --falls, and the mean self-weight per layer after --alpha-rounds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from lab import SPLITS, fmean, parse_variant, run, simulation, worst_drop

FRONTIER = ("fedrep", "fedper", "pfedhn", "ditto")


def self_weight_trace(trace: list) -> callable:
    def hook(sim, strategy, states, round_idx):
        if hasattr(strategy, "layer_weights"):
            alpha = strategy.layer_weights()
            n = alpha.shape[0]
            trace.append(alpha[torch.arange(n), :, torch.arange(n)].mean(0).tolist())
    return hook


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", default=["pfedla", "fedavg", "local"])
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/issue20-baselines.json"))
    parser.add_argument("--alpha-rounds", nargs="*", type=int, default=[5, 10, 25, 50, 100])
    parser.add_argument("--falls", action="store_true", help="evaluate every round, report the worst fall")
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cache = json.loads(args.cache.read_text()) if args.cache.is_file() else {}
    variants = [parse_variant(v) for v in args.variants]
    print(f"study: {' '.join(args.overrides)}  variants: {' | '.join(args.variants)}", flush=True)
    everything = {}
    for split in args.splits:
        results = {label: {} for label, _, _ in variants}
        for seed in args.seeds:
            sim = None
            for label, algorithm, settings in variants:
                key = f"{split}|{seed}|{' '.join(sorted(args.overrides))}|{algorithm}|falls={args.falls}"
                if not settings and algorithm == label and key in cache:
                    results[label][seed] = cache[key]
                    continue
                if sim is None:
                    sim = simulation([*args.overrides, *SPLITS[split], f"seed={seed}", "seeds=null"])
                trace: list = []
                out = run(sim, algorithm, every_round=args.falls, after_round=self_weight_trace(trace),
                          **dict(settings))
                entry = {"accuracy": out["accuracy"], "client_mean": out["client_mean"],
                         "seconds": out["seconds"], "trace": trace,
                         "fall": worst_drop(out["per_round"]) if args.falls else None}
                results[label][seed] = entry
                if not settings and algorithm == label:
                    cache[key] = entry
                    args.cache.write_text(json.dumps(cache))
                print(f"  {split} seed {seed} {label}: {100 * entry['accuracy']:.2f} / "
                      f"{100 * entry['client_mean']:.2f} ({entry['seconds']:.0f}s)", flush=True)
        everything[split] = results
        print_split(split, results, args)
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


def print_split(split: str, results: dict, args) -> None:
    means = {label: (fmean([r["accuracy"] for r in runs.values()]), fmean([r["client_mean"] for r in runs.values()]))
             for label, runs in results.items()}
    bar = [means[n][0] for n in ("fedavg", "local") if n in means]
    frontier = [means[n][1] for n in FRONTIER if n in means]
    print(f"== {split} (seeds {args.seeds}; % sample / client mean; gap: sample mean - max(fedavg, local); "
          f"front: client mean - best of {[n for n in FRONTIER if n in means]})")
    for label, runs in results.items():
        sample, client = means[label]
        cells = f"{label:<22}{100 * sample:7.2f} /{100 * client:6.2f}"
        if bar:
            cells += f"  gap {100 * (sample - max(bar)):+6.2f}"
        if frontier:
            cells += f"  front {100 * (client - max(frontier)):+6.2f}"
        cells += "  seeds " + " ".join(f"{100 * r['accuracy']:.2f}" for r in runs.values())
        falls = [r["fall"] for r in runs.values() if r.get("fall")]
        if falls:
            cells += "  worst fall " + " ".join(f"{f[0]:.1f}@r{f[1]}" for f in falls)
        traces = [r["trace"] for r in runs.values() if r.get("trace")]
        if traces:
            pts = [n for n in args.alpha_rounds if n <= len(traces[0])]
            cells += "  α_ii " + " ".join(
                f"r{n}:" + "/".join(f"{fmean([t[n - 1][layer] for t in traces]):.2f}"
                                    for layer in range(len(traces[0][0]))) for n in pts)
        print(cells, flush=True)


if __name__ == "__main__":
    main()
