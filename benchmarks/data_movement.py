"""data_movement: bytes one round moves through object storage, before and after the data plane.

N=30 clients with the paper CNN and CIFAR-10-sized data: ``worker`` runs the pipeline's real
steps for one round in a fresh process and sums their ledgers (after); ``bytes_before`` derives
the earlier layout's traffic from the same object sizes.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from common import Settings, log, measured_sizes, run_worker

from pfedla.algorithms import ClientRule, ClientState, FitInstruction
from pfedla.client import ClientUpdate, LocalTrainer
from pfedla.config import ExperimentConfig, config_from_dict
from pfedla.models import CNN


def worker(spec: dict) -> dict:
    """One round of the pipeline's real steps over a local data plane, in a fresh process.

    Two things are stand-ins, since only sizes matter here: the data (random CIFAR-10-shaped
    tensors; nothing to download) and the local training (an update of the right shapes instead
    of SGD: update bytes depend on shapes, not values). The model is the paper CNN.
    """
    from pfedla import steps
    from pfedla.data import ClientShard, FederatedData
    from pfedla.steps import round_traffic
    from pfedla_pipelines.runner import step_manifests

    clients, per_client = spec["clients"], spec["images_per_client"]
    test = per_client // 4  # test_fraction 0.25

    def cifar_like(config):
        generator = torch.Generator().manual_seed(0)
        shards = []
        for _ in range(clients):
            x = torch.rand(per_client, 3, 32, 32, generator=generator)
            y = torch.randint(0, 10, (per_client,), generator=generator)
            shards.append(ClientShard(x[test:], y[test:], x[:test], y[:test]))
        return FederatedData(shards, 10, (3, 32, 32))

    def paper_cnn(name, input_shape, num_classes, seed):
        torch.manual_seed(seed)
        return CNN(3, 32, 10, width=spec["width"], hidden=spec["hidden"])

    def same_shaped_update(rule: ClientRule, trainer: LocalTrainer, instruction: FitInstruction,
                           state: ClientState, train: tuple[torch.Tensor, torch.Tensor],
                           config: ExperimentConfig, round_idx: int, client_id: int
                           ) -> tuple[ClientUpdate, ClientState]:
        """``rounds.fit_client``'s contract: the update (None for private layers) and the new state."""
        delta = [None if layer is None else torch.full_like(layer, 1e-4) for layer in instruction.layers]
        return ClientUpdate(client_id, len(train[1]), delta, 1.0), state

    steps.build_federated_data, steps.build_model = cifar_like, paper_cnn
    steps.fit_client = same_shaped_update
    root = Path(spec["root"])
    config = config_from_dict({"clients": clients, "participation": spec["participation"], "rounds": 2,
                               "device": "cpu", "pipeline": {"data_root": str(root / "plane")}})
    cfg = config.to_json()
    out = root / "out"  # manifests named after the component outputs, as step_manifests expects
    shards_manifest, plan_manifest = out / "partition" / "shards", out / "server-init" / "plan"
    steps.partition(cfg, shards_manifest)
    steps.server_init(cfg, shards_manifest, plan_manifest)
    selected = sorted(json.loads(plan_manifest.read_text())["clients"], key=int)
    reports = []
    for client in selected:  # one client per pod
        reports.append(out / f"client-train-{client}" / "update")
        steps.client_train(cfg, client, plan_manifest, reports[-1])
    steps.server_round(cfg, 0, True, shards_manifest, plan_manifest, reports,
                       out / "server-round" / "next_plan")
    manifests = step_manifests(root / "out")
    plan = next(m for m in manifests if m["step"] == "server_init")
    shards = next(m for m in manifests if m["step"] == "partition")
    sizes = {
        "state": plan["state"]["size"], "model": plan["clients"][selected[0]]["model"]["size"],
        "train": plan["clients"][selected[0]]["train"]["size"],
        "update": next(r["update"]["size"] for m in manifests if m["step"] == "client_train"
                       for r in m["clients"].values()),
        "all_shards": sum(e["size"] for e in shards["train"] + shards["test"]),
        "manifests": sum(len(json.dumps(m)) for m in manifests
                         if m["step"] in ("client_train", "server_round")),
    }
    clients_moved = [m["transfers"]["read_bytes"] + m["transfers"]["written_bytes"]
                     for m in manifests if m["step"] == "client_train"]
    return {"selected": len(selected), "sizes": sizes, "after": round_traffic(manifests, 0),
            "client_pod_bytes": max(clients_moved)}


def bytes_before(sizes: dict, selected: int) -> dict:
    """One round under the earlier layout (whole artifacts downloaded by KFP's launcher), same objects.

    server-configure: shards + state in, S start models out; each client pod: shards + all S start
    models in, its update out; server-aggregate: shards + state + S updates in, state out.
    """
    shards, state, model, update = sizes["all_shards"], sizes["state"], sizes["model"], sizes["update"]
    configure = shards + state + selected * model
    client_pod = shards + selected * model + update
    aggregate = shards + state + selected * update + state
    return {"moved_bytes": configure + selected * client_pod + aggregate, "client_pod_bytes": client_pod}


def bench(settings: Settings) -> dict:
    """Bytes per round through object storage: the data plane (measured) vs the earlier layout (derived)."""
    model, clients, images = dict(settings.server_model), settings.movement_clients, settings.movement_images
    result: dict = {"clients": clients, "images_per_client": images,
                    "model": f"CNN(3, 32, 10, width={model['width']}, hidden={model['hidden']})",
                    "least": "clients: start model + train split in, update out; server: state + history "
                             "in and out, updates in, next round's start models out"}
    for participation in (0.5, 1.0):
        with tempfile.TemporaryDirectory() as tmp:
            log(f"data_movement: N={clients}, participation {participation} (real steps, one round)")
            measured = run_worker({"kind": "data_movement", "clients": clients, "images_per_client": images,
                                   "participation": participation, "root": tmp, **model})
        before = bytes_before(measured["sizes"], measured["selected"])
        after = measured["after"]
        result[str(measured["selected"])] = {
            **measured, "before": before,
            "reduction": before["moved_bytes"] / after["moved_bytes"],
            "client_pod_reduction": before["client_pod_bytes"] / measured["client_pod_bytes"],
        }
    return result


def table(result: dict) -> list[str]:
    """The section's lines of the printed table (the last section: no separator line after it)."""
    gb = 1e9
    lines = [
        f"data movement per round: N={result['clients']}, {result['model']}, "
        f"{result['images_per_client']} CIFAR-10-sized images per client; GB = 1e9 bytes",
        f"{'S':>4}{'before GB':>11}{'after GB':>10}{'least GB':>10}{'after/least':>13}{'reduction':>11}"
        f"{'pod before GB':>15}{'pod after GB':>14}",
    ]
    for key, row in measured_sizes(result):
        after = row["after"]
        before = row["before"]
        lines.append(f"{key:>4}{before['moved_bytes'] / gb:>11.2f}{after['moved_bytes'] / gb:>10.2f}"
                     f"{after['least_bytes'] / gb:>10.2f}{after['ratio']:>12.3f}x"
                     f"{row['reduction']:>10.1f}x{before['client_pod_bytes'] / gb:>15.3f}"
                     f"{row['client_pod_bytes'] / gb:>14.3f}")
    return lines
