#!/usr/bin/env python
"""Issue 20, done-when 3: what makes the last step destructive, from the states fall_diagnose.py cached.

    python benchmarks/issue20/fall_probe.py [--client 2] [--algorithms pfedla local]

For the client's start model of the last round (θ̄_i for pFedLA) prints: the per-sample gradient
norm of the logit margin (how far one SGD step moves the function: the NTK diagonal), the norm of
the features entering each layer, and then replays the last epoch under several training rules,
printing train/test accuracy at the end:
  today            batch mean over the batch's samples (a last batch of 5 weighs each sample 32/5)
  drop_last        the short last batch skipped
  nominal          every batch's loss summed and divided by the nominal batch size (32)
  clip1            today's, gradient norm clipped to 1
  lr/2             today's at half the learning rate
  own_start        today's rule, but from client i's own stored model θ_i instead of θ̄_i
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from lab import SPLITS, simulation, start
from torch import nn
from torch.func import functional_call

from pfedla.simulation import client_generators, load_client_states

CACHE = Path("/tmp/issue20-cache")


def features(model, params, x):
    """Mean L2 norm over samples of each parametrized layer's input."""
    norms = {}
    def hook(name):
        def record(module, inputs, output):
            norms[name] = float(inputs[0].flatten(1).norm(dim=1).mean())
        return record

    hooks = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
             if list(m.parameters(recurse=False))]
    with torch.no_grad():
        functional_call(model, params, (x,))
    for h in hooks:
        h.remove()
    return norms


def margin_grad_norms(model, layout, layers, x, y, count=64):
    """Per-sample ‖∂(logit_y − max other logit)/∂θ‖ over the first ``count`` samples: mean, max."""
    values = []
    for k in range(min(count, len(y))):
        leaves = [t.detach().clone().requires_grad_(True) for t in layers]
        logits = functional_call(model, layout.unflatten(leaves), (x[k:k + 1],))[0]
        other = logits.clone()
        other[y[k]] = -float("inf")
        margin = logits[y[k]] - other.max()
        grads = torch.autograd.grad(margin, leaves)
        values.append(float(torch.sqrt(sum((g * g).sum() for g in grads))))
    t = torch.tensor(values)
    return float(t.mean()), float(t.max())


def accuracy(model, layout, layers, x, y):
    with torch.no_grad():
        return float((functional_call(model, layout.unflatten(layers), (x,)).argmax(1) == y).float().mean())


def replay(sim, layers, x, y, generator, rule):
    config, model, layout = sim.config, sim.trainer.model, sim.layout
    lr = config.lr / 2 if rule == "lr/2" else config.lr
    flat = [t.clone() for t in layers]
    order = torch.randperm(len(y), generator=generator)
    for at in range(0, len(y), config.batch_size):
        batch = order[at:at + config.batch_size]
        if rule == "drop_last" and len(batch) < config.batch_size:
            continue
        leaves = [t.detach().requires_grad_(True) for t in flat]
        logits = functional_call(model, layout.unflatten(leaves), (x[batch],))
        if rule == "nominal":
            loss = nn.functional.cross_entropy(logits, y[batch], reduction="sum") / config.batch_size
        else:
            loss = nn.functional.cross_entropy(logits, y[batch])
        grads = torch.autograd.grad(loss, leaves)
        if rule == "clip1":
            norm = torch.sqrt(sum((g * g).sum() for g in grads))
            grads = [g * min(1.0, 1.0 / float(norm)) for g in grads]
        flat = [(t - lr * g).detach() for t, g in zip(flat, grads)]
    return flat


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algorithms", nargs="+", default=["pfedla", "local"])
    parser.add_argument("--clients", nargs="+", type=int, default=[2])
    parser.add_argument("--split", default="path2")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = ["model=cnn", "rounds=25", "local_epochs=1", "seed=7", "seeds=null", *SPLITS[args.split]]
    sim = simulation([*base, *args.overrides])
    config, layout, model = sim.config, sim.layout, sim.trainer.model
    last = config.rounds - 1
    for name in args.algorithms:
        strategy, states = start(sim, name)
        saved = torch.load(CACHE / f"{name}-{'_'.join(base + args.overrides).replace('/', '-')}.pt", weights_only=True)
        strategy.load_state_dict(saved)
        states = load_client_states(saved, states)
        instructions = strategy.configure_fit(last, list(range(config.clients)))
        for client in args.clients:
            x, y = sim.shards[client].train
            tx, ty = sim.shards[client].test
            layers = strategy.client_rule.start_model(instructions[client].layers, states[client]).layers
            feats = features(model, layout.unflatten(layers), x)
            mean_g, max_g = margin_grad_norms(model, layout, layers, x, y)
            print(f"== {name} client {client}: layer norms {' '.join(f'{float(t.norm()):.2f}' for t in layers)}; "
                  f"input feature norms {' '.join(f'{k} {v:.1f}' for k, v in feats.items())}; "
                  f"per-sample margin-gradient norm mean {mean_g:.1f} max {max_g:.1f}", flush=True)
            starts = {"today": layers, "drop_last": layers, "nominal": layers, "clip1": layers, "lr/2": layers}
            if hasattr(strategy, "models"):
                starts["own_start"] = strategy.models.client(client)
            for rule, begin in starts.items():
                gen = client_generators(config, last, client)("train")
                trained = replay(sim, begin, x, y, gen, "today" if rule == "own_start" else rule)
                print(f"   {rule:<10} train {100 * accuracy(model, layout, trained, x, y):.1f} "
                      f"test {100 * accuracy(model, layout, trained, tx, ty):.1f}", flush=True)


if __name__ == "__main__":
    main()
