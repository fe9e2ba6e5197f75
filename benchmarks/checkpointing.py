"""checkpointing: what a checkpoint costs in a simulation round at N=30 on the paper-size CNN.

A simulation round is the selected clients' local training, one after the other, plus the pFedLA
server step; a checkpoint writes the whole server state (30 models and the hypernetworks) through
``CheckpointStore.save`` (write-then-rename, pointer, pruning). Measured in this run: one client's
local training (default ``local_epochs``, ``batch_size`` and ``lr``) on 2,000 CIFAR-10-sized
images (500 with --quick, 8 with --tiny), the server step with every client taking part, and the checkpoint
save (medians). The round is 30 client trainings plus the server step; the table gives the
checkpoint's share of round time for several ``checkpoint_every``.
"""

from __future__ import annotations

import tempfile

import torch
from common import Settings, log, median_seconds
from server_step import make_server, ours_step, synthetic_deltas

from pfedla.checkpoint import CheckpointStore
from pfedla.client import LocalTrainer, ModelState, TrainSettings
from pfedla.config import ExperimentConfig
from pfedla.models import CNN, LayerLayout, initial_buffers, initial_layers
from pfedla.seeding import torch_generator

EVERY = (1, 5, 10)


def client_seconds(width: int, hidden: int, images: int) -> float:
    """One client's local training in the simulation's trainer, on random CIFAR-10-sized images."""
    defaults = ExperimentConfig()  # default local_epochs, batch_size and lr
    model = CNN(3, 32, 10, width=width, hidden=hidden)
    layout = LayerLayout.of(model)
    trainer = LocalTrainer(model, layout)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(images, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (images,), generator=generator)
    start = ModelState(initial_layers(model), initial_buffers(model))
    settings = TrainSettings(epochs=defaults.local_epochs, batch_size=defaults.batch_size, lr=defaults.lr)
    seconds, _ = median_seconds(lambda: trainer.train(start, x, y, settings, torch_generator(0, "bench")), 1)
    return seconds


def bench(settings: Settings) -> dict:
    """Client training, server step and checkpoint save at N=30; the checkpoint's share of a round."""
    model, count = dict(settings.server_model), settings.checkpoint_clients
    strategy, layout, params = make_server(count, **model)
    deltas = synthetic_deltas(layout, count, seed=1)
    clients = list(range(count))
    images = settings.checkpoint_images
    log(f"checkpointing: one client's training on {images} images ({params:,}-parameter CNN)")
    client_s = client_seconds(model["width"], model["hidden"], images)
    log("checkpointing: server step and checkpoint saves")
    rounds = iter(range(1000))
    server_s, _ = median_seconds(lambda: ours_step(strategy, next(rounds), clients, deltas),
                                 settings.server_repeats)
    state = strategy.state_dict()
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())
    with tempfile.TemporaryDirectory() as folder:
        store = CheckpointStore(folder, keep=2, run="0000000000000000-00000000")
        saves = iter(range(1, 1000))
        meta = {"history": [], "seconds": 0.0, "mlflow_run_id": None}
        save_s, times = median_seconds(lambda: store.save("pfedla", next(saves), state, meta), 3)
    round_s = count * client_s + server_s
    log(f"checkpointing: client {client_s:.1f} s, server {server_s:.1f} s, checkpoint {save_s:.2f} s")
    return {
        "params": params, "clients": count, "images_per_client": images, "client_s": client_s,
        "server_s": server_s, "round_s": round_s, "checkpoint_s": save_s, "checkpoint_times": times,
        "state_bytes": state_bytes,
        "share": {str(every): save_s / every / (round_s + save_s / every) for every in EVERY},
    }


def table(result: dict) -> list[str]:
    """The section's lines of the printed table, ending with a blank separator line."""
    lines = [
        f"checkpointing: N={result['clients']}, {result['params']:,}-parameter CNN, "
        f"{result['images_per_client']} images per client; state {result['state_bytes'] / 2**30:.2f} GiB",
        f"  round {result['round_s']:.1f} s = {result['clients']} x client {result['client_s']:.2f} s "
        f"+ server step {result['server_s']:.2f} s; checkpoint save {result['checkpoint_s']:.2f} s (median)",
        f"{'checkpoint_every':>18}{'share of round time':>22}",
    ]
    lines += [f"{every:>18}{share:>21.1%}" for every, share in result["share"].items()]
    lines.append("")
    return lines
