#!/usr/bin/env python
"""Issue 20, done-when 2: why α drifts toward self-weights on iid data over long runs.

    python benchmarks/issue20/drift.py [--variant pfedla[:settings]] [--split iid] [--seed 0]
        [--every 10] [key=value ...]

Runs one pFedLA variant (default: today's) and, every --every rounds, before the server step,
measures per layer (means over clients):
  cos_self   cos(Δ_i, θ_i − θ̄_i): the update's alignment with the own model's offset
  cos_other  mean_j≠i cos(Δ_i, θ_j − θ̄_i)
  |Δ|        ‖Δ_i‖ / mean‖θ‖ (relative update size)
  spread     ‖θ_i − θ̄_i‖ / mean‖θ‖
  pull_Δ     <Δ_i, θ_i − θ̄_i> − mean_j≠i <Δ_i, θ_j − θ̄_i>   (what the surrogate follows: > 0 favors self)
  pull_tr    the same with −∇(train loss)(θ̄_i) in place of Δ_i
  pull_te    the same with −∇(test loss)(θ̄_i): what would favor self if generalization were the aim
  (the three pulls are divided by ‖vector‖·mean‖θ‖, i.e. cosine-like, to compare their signs and
  trends), and α_ii. The test split is read only here, to diagnose; no algorithm sees it.
"""

from __future__ import annotations

import argparse

import torch
from lab import SPLITS, parse_variant, simulation, start
from torch import nn
from torch.func import functional_call

from pfedla.algorithms.base import stacked_deltas
from pfedla.simulation import participants


def loss_gradient(sim, layers, x, y):
    leaves = [t.detach().clone().requires_grad_(True) for t in layers]
    logits = functional_call(sim.trainer.model, sim.layout.unflatten(leaves), (x,))
    loss = nn.functional.cross_entropy(logits, y)
    return [g.detach() for g in torch.autograd.grad(loss, leaves)]


def pulls(vector: torch.Tensor, offsets: torch.Tensor, i: int, scale: float) -> float:
    """Self minus mean-other of <vector, θ_j − θ̄_i>, over ‖vector‖·scale."""
    dots = offsets @ vector
    others = torch.cat([dots[:i], dots[i + 1:]]).mean()
    return float((dots[i] - others) / (vector.norm() * scale + 1e-30))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", default="pfedla")
    parser.add_argument("--split", default="iid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    label, algorithm, settings = parse_variant(args.variant)
    sim = simulation([*args.overrides, *SPLITS[args.split], f"seed={args.seed}", "seeds=null"])
    strategy, states = start(sim, algorithm, **settings)
    names = sim.layout.names
    print(f"drift: {args.variant} {args.split} seed {args.seed} {' '.join(args.overrides)}; layers {names}")
    print("round layer   cos_self cos_other   |Δ|rel  spread   pull_Δ  pull_tr  pull_te   α_ii")
    for round_idx in range(sim.config.rounds):
        clients = participants(sim.config, round_idx)
        instructions = strategy.configure_fit(round_idx, clients)
        updates, failures = sim.train_round_clients(strategy.client_rule, instructions, states, round_idx)
        measure = (round_idx + 1) % args.every == 0 or round_idx in (0, 1, 4)
        if measure:
            deltas = stacked_deltas(updates, len(names))
            alpha = strategy.layer_weights()
            rows = [r.clone() for r in strategy.models.rows]
            stats = {name: [] for name in names}
            for s, update in enumerate(updates):
                i = update.client_id
                start_layers = instructions[i].layers
                g_tr = loss_gradient(sim, start_layers, *sim.shards[i].train)
                g_te = loss_gradient(sim, start_layers, *sim.shards[i].test)
                for layer, name in enumerate(names):
                    theta = rows[layer]
                    scale = float(theta.norm(dim=1).mean())
                    offsets = theta - start_layers[layer][None, :]
                    d = deltas[layer][s]
                    cos = nn.functional.cosine_similarity(offsets, d[None, :], dim=1)
                    stats[name].append([
                        float(cos[i]), float(torch.cat([cos[:i], cos[i + 1:]]).mean()),
                        float(d.norm()) / scale, float(offsets[i].norm()) / scale,
                        pulls(d, offsets, i, scale), pulls(-g_tr[layer], offsets, i, scale),
                        pulls(-g_te[layer], offsets, i, scale), float(alpha[i, layer, i])])
            for name in names:
                m = torch.tensor(stats[name]).mean(0).tolist()
                print(f"{round_idx + 1:>5} {name:<6} {m[0]:9.4f} {m[1]:9.4f} {m[2]:8.4f} {m[3]:7.4f} "
                      f"{m[4]:8.5f} {m[5]:8.5f} {m[6]:8.5f} {m[7]:6.3f}", flush=True)
        strategy.aggregate_fit(round_idx, updates, failures)


if __name__ == "__main__":
    main()
