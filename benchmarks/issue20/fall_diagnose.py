#!/usr/bin/env python
"""Issue 20, done-when 3: why one client's last local step breaks pFedLA's model and not Local's.

    python benchmarks/issue20/fall_diagnose.py [--algorithms pfedla local] [--last 5] [key=value ...]

Runs each algorithm for rounds-1 rounds of the fall case (fall.py's defaults), then replays the
last round's local training of every client batch by batch from the model the server sent
(θ̄_i for pFedLA), with the batch order the simulation uses. Prints per client: the start model's
train/test accuracy, the batch where accuracy fell most (its size, classes, loss, gradient norm
per layer, accuracy before and after), and at the start model: per-layer norms, the mean logit
margin, the top Hessian eigenvalue of the train loss (power iteration), the share of dead fc1
units.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from lab import SPLITS, simulation, start
from torch import nn
from torch.func import functional_call

from pfedla.simulation import client_state_tensors, load_client_states

CACHE = Path('/tmp/issue20-cache')


def accuracy(model, params, x, y):
    with torch.no_grad():
        logits = functional_call(model, params, (x,))
        top2 = logits.topk(2, dim=1).values
        return float((logits.argmax(1) == y).float().mean()), float((top2[:, 0] - top2[:, 1]).mean()), \
            float(nn.functional.cross_entropy(logits, y))


def top_eigenvalue(model, params, x, y, iterations=20):
    """Largest eigenvalue of the Hessian of the mean train loss at ``params`` (power iteration)."""
    names = list(params)
    values = [params[n].detach().requires_grad_(True) for n in names]
    loss = nn.functional.cross_entropy(functional_call(model, dict(zip(names, values)), (x,)), y)
    grads = torch.autograd.grad(loss, values, create_graph=True)
    vector = [torch.randn_like(v) for v in values]
    eig = 0.0
    for _ in range(iterations):
        norm = torch.sqrt(sum((v * v).sum() for v in vector))
        vector = [v / norm for v in vector]
        hv = torch.autograd.grad(grads, values, grad_outputs=vector, retain_graph=True)
        eig = float(sum((h * v).sum() for h, v in zip(hv, vector)))
        vector = [h.detach() for h in hv]
    return eig


def dead_share(model, params, x):
    """Share of fc1 units that are zero for every train sample."""
    captured = {}
    handle = model.fc1.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    with torch.no_grad():
        functional_call(model, params, (x,))
    handle.remove()
    return float(((captured["h"] > 0).sum(0) == 0).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algorithms", nargs="+", default=["pfedla", "local"])
    parser.add_argument("--split", default="path2")
    parser.add_argument("--clients", nargs="*", type=int)
    parser.add_argument("--no-hessian", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = ["model=cnn", "rounds=25", "local_epochs=1", "seed=7", "seeds=null", *SPLITS[args.split]]
    sim = simulation([*base, *args.overrides])
    config, layout, model = sim.config, sim.layout, sim.trainer.model
    last = config.rounds - 1
    print(f"fall_diagnose: {' '.join(base + args.overrides)}; layers {layout.names}")
    for name in args.algorithms:
        strategy, states = start(sim, name)
        cache = CACHE / f"{name}-{'_'.join(base + args.overrides).replace('/', '-')}.pt"
        if cache.is_file():
            saved = torch.load(cache, weights_only=True)
            strategy.load_state_dict(saved)
            states = load_client_states(saved, states)
        else:
            for round_idx in range(last):
                sim.run_round(strategy, states, round_idx)
            CACHE.mkdir(parents=True, exist_ok=True)
            torch.save({**strategy.state_dict(), **client_state_tensors(states)}, cache)
        clients = list(range(config.clients))
        instructions = strategy.configure_fit(last, clients)
        print(f"== {name}: the last round replayed batch by batch", flush=True)
        for client in args.clients or clients:
            shard = sim.shards[client]
            state = strategy.client_rule.start_model(instructions[client].layers, states[client])
            flat = [t.clone() for t in state.layers]
            params = layout.unflatten(flat)
            x, y = shard.train
            tx, ty = shard.test
            acc0, margin0, loss0 = accuracy(model, params, x, y)
            tacc0 = accuracy(model, params, tx, ty)[0]
            norms = " ".join(f"{float(t.norm()):.2f}" for t in flat)
            eig = float("nan") if args.no_hessian else top_eigenvalue(model, params, x, y)
            dead = dead_share(model, params, x)
            generator = torch.Generator().manual_seed(0)
            generator = sim_generator(config, last, client)
            order = torch.randperm(len(y), generator=generator)
            worst = None
            prev = (acc0, tacc0)
            for start_at in range(0, len(y), config.batch_size):
                batch = order[start_at:start_at + config.batch_size]
                leaves = [t.detach().requires_grad_(True) for t in flat]
                loss = nn.functional.cross_entropy(functional_call(model, layout.unflatten(leaves), (x[batch],)),
                                                   y[batch])
                grads = torch.autograd.grad(loss, leaves)
                flat = [(t - config.lr * g).detach() for t, g in zip(flat, grads)]
                params = layout.unflatten(flat)
                acc, _, _ = accuracy(model, params, x, y)
                tacc = accuracy(model, params, tx, ty)[0]
                fall = prev[1] - tacc
                if worst is None or fall > worst[0]:
                    worst = (fall, start_at // config.batch_size, len(batch), sorted(set(y[batch].tolist())),
                             float(loss), [float(g.norm()) for g in grads], prev, (acc, tacc))
                prev = (acc, tacc)
            fall, index, size, classes, bloss, gnorms, before, after = worst
            print(f"client {client:>2}: start train {100 * acc0:.1f} test {100 * tacc0:.1f} loss {loss0:.4f} "
                  f"margin {margin0:.1f} | layer norms {norms} | top eig {eig:.1f} | dead fc1 {100 * dead:.0f}%",
                  flush=True)
            print(f"   worst batch {index} (size {size}, classes {classes}): loss {bloss:.3f}, grad norms "
                  f"{' '.join(f'{g:.3g}' for g in gnorms)}; test {100 * before[1]:.1f} -> {100 * after[1]:.1f}, "
                  f"train {100 * before[0]:.1f} -> {100 * after[0]:.1f}; end test {100 * prev[1]:.1f}",
                  flush=True)


def sim_generator(config, round_idx, client):
    from pfedla.simulation import client_generators
    return client_generators(config, round_idx, client)("train")


if __name__ == "__main__":
    main()
