"""The round's phases as pipeline steps over the data plane: what each Kubeflow component calls.

A step reads small JSON manifests (its input artifacts), fetches from the data plane
(:mod:`pfedla.dataplane`) exactly the objects it needs, writes its own objects there and an
output manifest, and returns a summary for the artifact's metadata that the KFP launcher
accepts (finite numbers, strings, booleans). Every step is a deterministic function of its
inputs (config, seed, round, manifests), so a pipeline run reproduces ``pfedla run`` exactly
on CPU. Manifests, by kind:

- ``shards``:     the data's shape, each client's train and test object, the partition stats
- ``plan``:       the server state before round ``round`` (state + history objects, and the table
                  of where each client's own state is) and, for each of the round's clients, its
                  start model θ̄_i (without the layers it keeps private), its train object and its
                  client state object (its private layers, running statistics, personal model)
- ``updates``:    per client of one training pod, its update Δ_i (shared layers only) with sample
                  count and loss and its new client state object, or the reason it failed
- ``evaluation``: accuracies, the personalized models, α (pFedLA)
- ``checkpoint``: a copy of the state at a segment's end, from which the next segment starts
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pfedla import storage
from pfedla.algorithms import (
    ClientRule,
    ClientState,
    FitInstruction,
    Strategy,
    make_client_rule,
    make_strategy,
)
from pfedla.client import (
    ClientFailure,
    ClientUpdate,
    LocalTrainer,
    ModelState,
    failure_reason,
    select_device,
    update_problem,
)
from pfedla.config import ExperimentConfig, config_from_dict, experiment_key
from pfedla.data import build_federated_data
from pfedla.dataplane import (
    DataPlane,
    ObjectRef,
    checkpoint_folder,
    client_folder,
    config_ref,
    data_root,
    finite_summary,
    read_object,
    ref_at,
    report_key,
    round_folder,
    run_prefix,
)
from pfedla.errors import ArtifactError
from pfedla.models import LayerLayout, build_model, initial_buffers, initial_layers
from pfedla.results import LayerWeights
from pfedla.rounds import (
    accuracy_metrics,
    check_finite,
    close_round,
    evaluate_models,
    fit_client,
    layer_weights,
    participants,
    personalize_clients,
    personalized_models,
)

SHARDS, PLAN, UPDATES, EVALUATION, CHECKPOINT = (
    "pfedla/shards", "pfedla/plan", "pfedla/updates", "pfedla/evaluation", "pfedla/checkpoint")
PLAN_FIELDS = ("round", "data", "state", "history", "client_states", "clients")
log = logging.getLogger(__name__)


def parse_config(config_json: str) -> ExperimentConfig:
    """The experiment config from its JSON (``ExperimentConfig.to_json``)."""
    return config_from_dict(json.loads(config_json))


def config_reference(config: ExperimentConfig) -> str:
    """What every step but ``partition`` is given instead of the config: the JSON of the reference
    (URI, size, sha256) of the object ``partition`` writes. It is a few dozen bytes in each pod's
    executor input, where the config itself would be kilobytes in every one."""
    return json.dumps(config_ref(config).to_dict(), sort_keys=True)


def _config_object(config_ref: str) -> ObjectRef:
    try:
        raw = json.loads(config_ref)
    except ValueError:
        raise ArtifactError(f"config_ref is not JSON: {config_ref!r:.80}") from None
    return ObjectRef.from_dict(raw, "config_ref")


def publish_config(config_json: str, config_ref: str) -> ExperimentConfig:
    """Write the config where ``config_ref`` says the later steps read it; both must come from one
    compile (the reference holds the JSON's sha256)."""
    ref, body = _config_object(config_ref), config_json.encode()
    if len(body) != ref.size or hashlib.sha256(body).hexdigest() != ref.sha256:
        raise ArtifactError("config_json does not match config_ref (its size and sha256): both come from one "
                            "`pfedla pipeline compile`; compile again instead of editing one of them")
    config = parse_config(config_json)
    storage.write_bytes(ref.uri, body)
    return config


def read_config(config_ref: str) -> ExperimentConfig:
    """The experiment config a step is given by reference, refused unless its bytes match the reference."""
    ref = _config_object(config_ref)
    return parse_config(read_object(ref).decode())


def data_plane(config: ExperimentConfig) -> DataPlane:
    """The experiment's data plane under ``pipeline.data_root``."""
    return DataPlane(run_prefix(config, data_root(config)))


def client_groups(clients: Sequence[int], clients_per_pod: int) -> list[list[int]]:
    """The round's clients in training pods of ``clients_per_pod``, in order."""
    return [list(clients[i : i + clients_per_pod]) for i in range(0, len(clients), clients_per_pod)]


def group_label(group: Sequence[int]) -> str:
    """A training pod's clients as the ParallelFor item: ``"3,7,9"``."""
    return ",".join(str(c) for c in group)


def round_pods(config: ExperimentConfig, round_idx: int) -> list[str]:
    """The round's training pods as ParallelFor items: its participants, ``clients_per_pod`` per pod."""
    groups = client_groups(participants(config, round_idx), config.pipeline.clients_per_pod)
    return [group_label(group) for group in groups]


def parse_group(label: str) -> list[int]:
    try:
        clients = [int(part) for part in label.split(",")]
    except ValueError:
        raise ArtifactError(f"not a client group: {label!r:.80} (expected ids like 3,7,9)") from None
    return clients


@dataclass
class ModelContext:
    """The architecture every step rebuilds from the config and the data's shape."""

    model: torch.nn.Module
    layout: LayerLayout
    num_clients: int
    init: ModelState  # the shared initial model, from which every client's first state derives

    @classmethod
    def of(cls, config: ExperimentConfig, data: dict[str, Any]) -> ModelContext:
        try:
            shape, classes, clients = tuple(data["input_shape"]), data["num_classes"], data["num_clients"]
        except (KeyError, TypeError):
            raise ArtifactError(f"manifest data description is damaged: {data!r:.200}") from None
        model = build_model(config.model, shape, classes, config.seed)
        init = ModelState(initial_layers(model), initial_buffers(model))
        return cls(model, LayerLayout.of(model), clients, init)


def _strategy(config: ExperimentConfig, context: ModelContext) -> Strategy:
    return make_strategy(config.pipeline.algorithm, config, context.model)


def _layers(tensors: dict[str, torch.Tensor], prefix: str, layout: LayerLayout, where: str,
            private: frozenset[int] = frozenset()) -> list[torch.Tensor | None]:
    """The layers ``<prefix>.<i>`` of an object, None for the ``private`` ones, which it must not hold."""
    try:
        if extra := sorted(i for i in private if f"{prefix}.{i}" in tensors):
            raise ValueError(f"it holds layers {extra}, which stay on the client")
        layers = [None if i in private else tensors[f"{prefix}.{i}"] for i in range(layout.num_layers)]
        layout.check(layers, skip=private)
    except (KeyError, ValueError) as error:
        raise ArtifactError(f"{where} does not fit the configured model: {error}") from None
    return layers


def _client_state(plane: DataPlane, rule: ClientRule, context: ModelContext, entry: dict[str, Any] | None,
                  ) -> ClientState:
    """A client's own state from its object, or its initial state before it has one."""
    initial = rule.initial_state(context.init)
    if entry is None:
        return initial
    ref = ObjectRef.from_dict(entry, "client state")
    tensors, _ = plane.get_tensors(ref)
    try:
        return ClientState.from_tensors(tensors, initial)
    except ArtifactError as error:
        raise ArtifactError(f"{ref.uri}: {error}") from None


def _client_states(plane: DataPlane, ref: ObjectRef) -> dict[str, Any]:
    """The table client id -> client state object (a client without one has its initial state)."""
    table = plane.get_json(ref)
    if not isinstance(table, dict):
        raise ArtifactError("the client state table is not a mapping of client ids to objects")
    return table


def _io_summary(plane: DataPlane) -> dict[str, int]:
    return {"read_bytes": plane.transfers.read_bytes, "written_bytes": plane.transfers.written_bytes}


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    """A history entry: metrics that are not finite (a diverged model's loss) are left out, since
    the history is strict JSON and every value ends up in MLflow and the launcher's metadata."""
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and not math.isfinite(v))}


def _entries(manifest: dict[str, Any], key: str, source: str | Path) -> dict[str, Any]:
    entries = manifest.get(key)
    if not isinstance(entries, dict):
        raise ArtifactError(f"{source}: manifest has no '{key}' table")
    return entries


# -- partition ---------------------------------------------------------------------------------------------

def partition(config_json: str, config_ref: str, shards_out: str | Path) -> dict[str, Any]:
    """Write the config where ``config_ref`` says (the one step given it inline), then build the
    federated data once: one train and one test object per client."""
    config = publish_config(config_json, config_ref)
    plane = data_plane(config)
    data = build_federated_data(config)
    train, test = [], []
    for index, shard in enumerate(data.shards):
        train.append(plane.put_tensors(f"data/client_{index}.train.safetensors",
                                       {"x": shard.train_x, "y": shard.train_y}).to_dict())
        test.append(plane.put_tensors(f"data/client_{index}.test.safetensors",
                                      {"x": shard.test_x, "y": shard.test_y}).to_dict())
    stats = plane.put_json("data/partition.json", {"clients": data.class_counts()})
    described = {"num_classes": data.num_classes, "input_shape": list(data.input_shape),
                 "num_clients": data.num_clients, "num_train": [s.num_train for s in data.shards]}
    plane.write_manifest(shards_out, SHARDS, {"step": "partition", "data": described, "train": train,
                                              "test": test, "partition": stats.to_dict()})
    return finite_summary({"num_clients": data.num_clients, "num_classes": data.num_classes,
                           "input_shape": "x".join(map(str, data.input_shape)), **_io_summary(plane)})


def _data_shape(shards: dict[str, Any]) -> dict[str, Any]:
    return {key: shards["data"][key] for key in ("num_classes", "input_shape", "num_clients")}


# -- server state ------------------------------------------------------------------------------------------

def _save_state(plane: DataPlane, round_idx: int, strategy: Strategy, history: list[dict[str, float]],
                client_states: dict[str, Any]) -> tuple[ObjectRef, ObjectRef, ObjectRef]:
    """The server state, history and client state table that round ``round_idx`` starts from."""
    folder = round_folder(round_idx)
    state = plane.put_tensors(f"{folder}/state.safetensors", strategy.state_dict(),
                              {"algorithm": strategy.name, "next_round": round_idx})
    return (state, plane.put_json(f"{folder}/history.json", history),
            plane.put_json(f"{folder}/client_states.json", client_states))


def _load_state(plane: DataPlane, config: ExperimentConfig, context: ModelContext, state: ObjectRef,
                history: ObjectRef) -> tuple[Strategy, int, list[dict[str, float]]]:
    tensors, meta = plane.get_tensors(state)
    if meta.get("algorithm") != config.pipeline.algorithm:
        raise ArtifactError(f"{state.uri} holds {meta.get('algorithm')!r} state, "
                            f"but pipeline.algorithm is {config.pipeline.algorithm!r}")
    strategy = _strategy(config, context)
    strategy.load_state_dict(tensors)
    records = plane.get_json(history)
    if not isinstance(records, list):
        raise ArtifactError(f"{history.uri}: the history is not a list of rounds")
    return strategy, int(meta.get("next_round", 0)), records


def _state_of(plane: DataPlane, config: ExperimentConfig, context: ModelContext, plan: dict[str, Any]
              ) -> tuple[Strategy, list[dict[str, float]]]:
    strategy, next_round, history = _load_state(plane, config, context, ref_at(plan, "state"),
                                                ref_at(plan, "history"))
    if next_round != plan["round"]:
        raise ArtifactError(f"the plan is for round {plan['round']}, but its state continues at {next_round}")
    return strategy, history


def _configure(plane: DataPlane, config: ExperimentConfig, strategy: Strategy, round_idx: int,
               shards: dict[str, Any], state: ObjectRef, history: ObjectRef, client_states: ObjectRef,
               table: dict[str, Any]) -> dict[str, Any]:
    """The plan of ``round_idx``: each selected client's start model θ̄_i (its private layers left
    out), written to the data plane, and where its own state is (``table``)."""
    clients: dict[str, Any] = {}
    for client, instruction in strategy.configure_fit(round_idx, participants(config, round_idx)).items():
        model = plane.put_tensors(f"{round_folder(round_idx)}/models/client_{client}.safetensors",
                                  {f"layer.{i}": t for i, t in enumerate(instruction.layers)
                                   if t is not None},
                                  {"round": round_idx, "kept_local": sorted(instruction.kept_local),
                                   "proximal_mu": instruction.proximal_mu})
        clients[str(client)] = {"model": model.to_dict(), "train": ref_at(shards, "train", client).to_dict(),
                                "bytes_down": instruction.bytes_sent(),
                                **({"state": table[str(client)]} if str(client) in table else {})}
    return {"round": round_idx, "data": _data_shape(shards), "state": state.to_dict(),
            "history": history.to_dict(), "client_states": client_states.to_dict(), "clients": clients}


def _resume_location(config: ExperimentConfig, plane: DataPlane) -> str:
    start = config.pipeline.start_round
    folder = config.pipeline.resume_from or plane.uri(checkpoint_folder(start))
    return f"{folder.rstrip('/')}/manifest.json"


def server_init(config_ref: str, shards_in: str | Path, plan_out: str | Path) -> dict[str, Any]:
    """A fresh server state (or the checkpoint this segment starts from) and the first round's plan."""
    config = read_config(config_ref)
    plane = data_plane(config)
    shards = plane.read_manifest(shards_in, SHARDS)
    context = ModelContext.of(config, shards["data"])
    start = config.pipeline.start_round
    if start == 0 and not config.pipeline.resume_from:
        strategy = _strategy(config, context)
        state, history, client_states = _save_state(plane, 0, strategy, [], {})
    else:
        location = _resume_location(config, plane)
        checkpoint = plane.read_manifest(location, CHECKPOINT)
        state, history = ref_at(checkpoint, "state"), ref_at(checkpoint, "history")
        client_states = ref_at(checkpoint, "client_states")
        strategy, next_round, _ = _load_state(plane, config, context, state, history)
        if next_round != start:
            raise ArtifactError(f"{location} continues at round {next_round}, "
                                f"but pipeline.start_round is {start}")
    plan = _configure(plane, config, strategy, start, shards, state, history, client_states,
                      _client_states(plane, client_states))
    plane.write_manifest(plan_out, PLAN, {"step": "server_init", "step_round": start, **plan})
    return finite_summary({"round": start, "clients": len(plan["clients"]), **_io_summary(plane)})


# -- client training ---------------------------------------------------------------------------------------

def _train_one(plane: DataPlane, config: ExperimentConfig, context: ModelContext, rule: ClientRule,
               trainer: LocalTrainer, device: torch.device, plan: dict[str, Any], client: int
               ) -> tuple[ClientUpdate, ClientState]:
    round_idx = plan["round"]
    model = ref_at(plan, "clients", client, "model")
    tensors, meta = plane.get_tensors(model)
    start = _layers(tensors, "layer", context.layout, model.uri, rule.private)
    train = _split(plane, ref_at(plan, "clients", client, "train"), client, device)
    state = _client_state(plane, rule, context, plan["clients"][str(client)].get("state"))
    instruction = FitInstruction([None if t is None else t.to(device) for t in start],
                                 frozenset(meta.get("kept_local", [])), float(meta.get("proximal_mu", 0.0)))
    update, new_state = fit_client(rule, trainer, instruction, state, train, config, round_idx, client)
    if problem := update_problem(update, config.max_update_norm):  # no need to upload what will be refused
        raise ArtifactError(problem)
    return update, new_state


def _split(plane: DataPlane, ref: ObjectRef, client: int, device: torch.device | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's train or test split (x, y)."""
    split, _ = plane.get_tensors(ref)
    if set(split) != {"x", "y"}:
        raise ArtifactError(f"the split {ref.uri} of client {client} lacks x or y")
    return split["x"].to(device), split["y"].to(device)


def client_train(config_ref: str, clients: str, plan_in: str | Path, updates_out: str | Path
                 ) -> dict[str, Any]:
    """Train each client of one pod's group from its own start model on its own train split.

    A client whose training fails (raises, times out, diverges, cannot read its objects) is
    reported with the reason instead of an update: the round goes on without it, as in the
    simulation. Only a dying process fails the step (and is retried).
    """
    config = read_config(config_ref)
    plane = data_plane(config)
    plan = plane.read_manifest(plan_in, PLAN)
    group = parse_group(clients)
    unknown = [c for c in group if str(c) not in _entries(plan, "clients", plan_in)]
    if unknown:
        raise ArtifactError(f"clients {unknown} are not part of round {plan['round']}'s plan")
    context = ModelContext.of(config, plan["data"])
    rule = make_client_rule(config.pipeline.algorithm, config, context.model)
    device = select_device(config.device)
    trainer = LocalTrainer(context.model.to(device), context.layout)  # one per pod, reused by its clients
    round_idx, reports = plan["round"], {}
    for client in group:
        try:
            update, state = _train_one(plane, config, context, rule, trainer, device, plan, client)
        except Exception as error:  # reported to the server step rather than failing the whole round
            reason = failure_reason(error) if not isinstance(error, ArtifactError) else str(error)
            log.warning("round %d: client %d failed: %s", round_idx, client, reason)
            reports[str(client)] = {"failed": reason}
            continue
        ref = plane.put_tensors(f"{round_folder(round_idx)}/updates/client_{client}.safetensors",
                                {f"delta.{i}": d for i, d in enumerate(update.delta) if d is not None})
        loss = {"train_loss": update.train_loss} if math.isfinite(update.train_loss) else {}
        reports[str(client)] = {"update": ref.to_dict(), "num_samples": update.num_samples, **loss}
        if kept := state.tensors():  # the client's own storage, never read by the server step
            own = plane.put_tensors(f"{client_folder(client, round_idx)}/state.safetensors", kept)
            reports[str(client)]["state"] = own.to_dict()
    plane.write_manifest(updates_out, UPDATES, {"step": "client_train", "step_round": round_idx,
                                                "round": round_idx, "clients": reports},
                         also_at=report_key(round_idx, group))
    failed = [c for c, report in reports.items() if "failed" in report]
    return finite_summary({"round": round_idx, "clients": clients, "failed": bool(failed),
                           "failed_clients": ",".join(failed), **_io_summary(plane)})


# -- aggregation -------------------------------------------------------------------------------------------

def _read_report(plane: DataPlane, client: int, report: Any, known_samples: int, layout: LayerLayout,
                 private: frozenset[int]) -> ClientUpdate | ClientFailure:
    """One client's report: its checked update, or the failure it reported or that its report shows."""
    if not isinstance(report, dict):
        return ClientFailure(client, "damaged report")
    if "failed" in report:
        return ClientFailure(client, str(report["failed"])[:500])
    try:
        num_samples, loss = report["num_samples"], float(report.get("train_loss", math.nan))
        if type(num_samples) is not int or num_samples != known_samples:
            # FedAvg weights by it: only the count the server knows from the partition is accepted
            raise ValueError(f"num_samples must be the {known_samples} samples of its train split, "
                             f"got {num_samples!r:.40}")
        ref = ref_at(report, "update")
        tensors, _ = plane.get_tensors(ref)
        delta = _layers(tensors, "delta", layout, ref.uri, private)
        if "state" in report:  # only referenced (the client's own object), but it must be a reference
            ref_at(report, "state")
    except (ArtifactError, KeyError, TypeError, ValueError) as error:
        return ClientFailure(client, f"unusable update: {error}")
    return ClientUpdate(client, num_samples, delta, loss)


def pod_reports(config: ExperimentConfig, round_idx: int) -> list[str]:
    """The data-plane keys of round ``round_idx``'s pod reports, one per training pod: the server step
    reads them there, so its inputs do not grow with the round's pods (see ``report_key``)."""
    groups = client_groups(participants(config, round_idx), config.pipeline.clients_per_pod)
    return [report_key(round_idx, group) for group in groups]


def server_round(config_ref: str, round_idx: int, configure_next: bool, shards_in: str | Path,
                 plan_in: str | Path, plan_out: str | Path) -> dict[str, Any]:
    """Fold round ``round_idx``'s reports into the server state; plan round + 1 when ``configure_next``.

    The pipeline runs this step after every training pod of the round; it reads each pod's report
    at its fixed key (``pod_reports``). Failed clients and unusable, non-finite or oversized updates
    are left out and counted; more than ``max_failed_fraction`` of them aborts the run. Every
    selected client must be reported exactly once. Round objects older than
    ``pipeline.keep_rounds`` rounds are deleted.
    """
    started = time.perf_counter()
    config = read_config(config_ref)
    plane = data_plane(config)
    shards, plan = plane.read_manifest(shards_in, SHARDS), plane.read_manifest(plan_in, PLAN)
    if plan["round"] != round_idx:
        raise ArtifactError(f"{plan_in} plans round {plan['round']}, not {round_idx}")
    context = ModelContext.of(config, plan["data"])
    strategy, history = _state_of(plane, config, context, plan)
    outcomes: list[ClientUpdate | ClientFailure] = []
    new_states: dict[str, Any] = {}
    client_io = {"read_bytes": 0, "written_bytes": 0}
    for source in (plane.uri(key) for key in pod_reports(config, round_idx)):
        manifest = plane.read_manifest(source, UPDATES)
        if manifest.get("round") != round_idx:
            raise ArtifactError(f"{source} reports round {manifest.get('round')}, not {round_idx}")
        ledger = manifest.get("transfers") or {}
        for key in client_io:
            client_io[key] += int(ledger.get(key, 0))
        for client, report in _entries(manifest, "clients", source).items():
            try:
                client_id = int(client)
            except ValueError:
                raise ArtifactError(f"{source}: {client!r:.40} is not a client id") from None
            known = shards["data"]["num_train"][client_id] if 0 <= client_id < context.num_clients else -1
            outcome = _read_report(plane, client_id, report, known, context.layout,
                                   strategy.client_rule.private)
            outcomes.append(outcome)
            if isinstance(outcome, ClientUpdate) and "state" in report:  # its training finished: new state
                new_states[str(client_id)] = report["state"]
    selected = participants(config, round_idx)
    delivered = sorted(o.client_id for o in outcomes)
    if delivered != selected:
        raise ArtifactError(f"round {round_idx}: reports came from clients {delivered}, "
                            f"but the round selected {selected}")
    bytes_down = sum(entry["bytes_down"] for entry in _entries(plan, "clients", plan_in).values())
    closed = close_round(strategy, config, round_idx, [o for o in outcomes if isinstance(o, ClientUpdate)],
                         [o for o in outcomes if isinstance(o, ClientFailure)], bytes_down)
    metrics, failures = closed.metrics, closed.failures
    metrics.update({"clients_read_bytes": float(client_io["read_bytes"]),
                    "clients_written_bytes": float(client_io["written_bytes"]),
                    "server_read_bytes": float(plane.transfers.read_bytes)})
    # No timings in the history: a retried step must write the very same objects (their keys are reused).
    check_finite(strategy.state_dict(), "the server state", config, strategy.name, round_idx)
    entry = {"round": round_idx, **_finite(metrics)}
    table = {**_client_states(plane, ref_at(plan, "client_states")), **new_states}
    state, history_ref, table_ref = _save_state(plane, round_idx + 1, strategy, [*history, entry], table)
    if configure_next:
        next_plan = _configure(plane, config, strategy, round_idx + 1, shards, state, history_ref, table_ref,
                               table)
    else:  # the segment ends here: the next one configures its first round from the checkpoint
        next_plan = {"round": round_idx + 1, "data": plan["data"], "state": state.to_dict(),
                     "history": history_ref.to_dict(), "client_states": table_ref.to_dict(), "clients": {}}
    stale = round_idx - config.pipeline.keep_rounds
    if stale >= 0:  # the inputs of this step stay (a retried step needs them); older rounds go
        plane.delete_folder(round_folder(stale))
    for client in new_states:  # likewise each client's newest keep_rounds + 1 states stay
        versions = sorted(plane.folders(f"clients/client_{client}"))
        for old in versions[: max(0, len(versions) - config.pipeline.keep_rounds - 1)]:
            plane.delete_folder(f"clients/client_{client}/{old}")
    plane.write_manifest(plan_out, PLAN, {"step": "server_round", "step_round": round_idx, **next_plan})
    return finite_summary({"round": round_idx, "failed_clients": len(failures), "clients": len(selected),
                           "train_loss": metrics.get("train_loss"), "seconds": time.perf_counter() - started,
                           **_io_summary(plane)})


# -- evaluation, checkpoint, record ------------------------------------------------------------------------

def evaluate(config_ref: str, shards_in: str | Path, plan_in: str | Path, plan_out: str | Path,
             evaluation_out: str | Path, final: bool) -> dict[str, Any]:
    """Every client's personalized model on its own test split; the result joins the history.

    The plan passes through with the new history. With ``final`` (the run's last evaluation),
    the personalized models and α are written too.
    """
    config = read_config(config_ref)
    plane = data_plane(config)
    shards, plan = plane.read_manifest(shards_in, SHARDS), plane.read_manifest(plan_in, PLAN)
    context = ModelContext.of(config, plan["data"])
    strategy, history = _state_of(plane, config, context, plan)
    rounds_done, rule = plan["round"], strategy.client_rule
    table = _client_states(plane, ref_at(plan, "client_states"))
    clients = range(context.num_clients)
    states = [_client_state(plane, rule, context, table.get(str(c))) for c in clients]
    trains = [_split(plane, ref_at(shards, "train", c), c) if rule.personalizes_with_data else None
              for c in clients]
    trainer = LocalTrainer(context.model, context.layout)
    models = personalize_clients(strategy, trainer, states, trains, config, rounds_done)
    check_finite(personalized_models(models, context.layout), "a client's evaluated model", config,
                 strategy.name, rounds_done - 1)
    tests = [_split(plane, ref_at(shards, "test", c), c) for c in clients]
    results = evaluate_models(context.model, context.layout, models, tests)
    metrics = _finite(accuracy_metrics(results))
    if history and history[-1].get("round") == rounds_done - 1:
        history = [*history[:-1], {**history[-1], **metrics}]
    history_ref = plane.put_json(f"{round_folder(rounds_done)}/history.evaluated.json", history)
    passed_on = {**{key: plan[key] for key in PLAN_FIELDS}, "history": history_ref.to_dict()}
    plane.write_manifest(plan_out, PLAN, {"step": "evaluate", **passed_on}, ledger=False)
    outcome: dict[str, Any] = {"step": "evaluate", "step_round": rounds_done, "round": rounds_done,
                               "final": final, "metrics": metrics}
    if final:
        folder = f"evaluations/round_{rounds_done:05d}"
        outcome["evaluation"] = plane.put_json(f"{folder}/evaluation.json", {
            "algorithm": strategy.name, "mean_accuracy": metrics["accuracy_mean"],
            "client_mean_accuracy": metrics["accuracy_client_mean"],
            "client_accuracies": [r.accuracy for r in results], "rounds": rounds_done, "history": history,
        }).to_dict()
        if rounds_done >= config.rounds:  # only the experiment's end is logged and registered
            about = {"algorithm": strategy.name, "model": config.model}
            named = personalized_models(models, context.layout)
            outcome["models"] = plane.put_tensors(f"{folder}/models.safetensors", named, about).to_dict()
        if (weights := layer_weights(strategy)) is not None:
            tensors = {"alpha": torch.from_numpy(weights.alpha)}
            if weights.raw is not None:
                tensors["alpha_raw"] = torch.from_numpy(weights.raw)
            outcome["layer_weights"] = plane.put_tensors(f"{folder}/layer_weights.safetensors",
                                                         tensors).to_dict()
    plane.write_manifest(evaluation_out, EVALUATION, outcome)
    return finite_summary({"round": rounds_done, **metrics, **_io_summary(plane)})


def round_traffic(manifests: Sequence[dict[str, Any]], round_idx: int) -> dict[str, float]:
    """Bytes round ``round_idx`` moved through the data plane (its client steps and server step, from
    their ledgers) against the least it could: each selected client reads its start model, train
    split and own state and writes its update and new state; the server reads the state and the
    updates, and writes the new state and the next round's start models."""
    def sizes(refs: Any) -> int:
        return sum(entry["size"] for entry in refs)

    clients = [m for m in manifests if m["step"] == "client_train" and m["step_round"] == round_idx]
    (server,) = [m for m in manifests if m["step"] == "server_round" and m["step_round"] == round_idx]
    plan = next(m for m in manifests if m["kind"] == PLAN and m.get("round") == round_idx and m["clients"])
    reports = [report for m in clients for report in m["clients"].values()]
    updates = [report["update"] for report in reports if "update" in report]
    # a client with a state of its own reads its last one and writes the new one
    own_states = [e["state"] for e in plan["clients"].values() if "state" in e] + \
        [report["state"] for report in reports if "state" in report]
    client_least = sizes(e["model"] for e in plan["clients"].values()) + \
        sizes(e["train"] for e in plan["clients"].values()) + sizes(updates) + sizes(own_states)
    state_in, state_out = (m["state"]["size"] + m["history"]["size"] for m in (plan, server))
    next_models = sizes(e["model"] for e in server["clients"].values())
    server_least = state_in + sizes(updates) + state_out + next_models
    moved = sum(m["transfers"]["read_bytes"] + m["transfers"]["written_bytes"] for m in [*clients, server])
    least = client_least + server_least
    return {"moved_bytes": moved, "least_bytes": least, "ratio": moved / least,
            "client_pods": len(clients), "clients": len(plan["clients"])}


def _final_evaluation(plane: DataPlane, evaluation_in: str | Path
                      ) -> tuple[dict[str, Any], dict[str, Any], LayerWeights | None]:
    """A final evaluation's manifest, its ``evaluation.json`` content and α (None unless pFedLA)."""
    manifest = plane.read_manifest(evaluation_in, EVALUATION)
    evaluation = plane.get_json(ref_at(manifest, "evaluation"))
    weights = None
    if "layer_weights" in manifest:
        tensors, _ = plane.get_tensors(ref_at(manifest, "layer_weights"))
        raw = tensors.get("alpha_raw")
        weights = LayerWeights(tensors["alpha"].numpy(), None if raw is None else raw.numpy())
    return manifest, evaluation, weights


def read_evaluation(config: ExperimentConfig, evaluation_in: str | Path
                    ) -> tuple[dict[str, Any], LayerWeights | None]:
    """A final evaluation: its ``evaluation.json`` content and α (None unless pFedLA)."""
    _, evaluation, weights = _final_evaluation(data_plane(config), evaluation_in)
    return evaluation, weights


def checkpoint(config_ref: str, plan_in: str | Path, checkpoint_out: str | Path) -> dict[str, Any]:
    """Version the segment's final state under ``checkpoints/round_<r>/``; the LATEST pointer last.

    The store copies the objects itself, so no state bytes pass through this step (the clients'
    own states are copied too: the clients drop their older versions). The newest
    ``keep_checkpoints`` versions are kept.
    """
    config = read_config(config_ref)
    plane = data_plane(config)
    plan = plane.read_manifest(plan_in, PLAN)
    rounds_done, folder = plan["round"], checkpoint_folder(plan["round"])
    state = plane.copy(ref_at(plan, "state"), f"{folder}/state.safetensors")
    history = plane.copy(ref_at(plan, "history"), f"{folder}/history.json")
    table = {client: plane.copy(ObjectRef.from_dict(entry, f"client {client}'s state"),
                                f"{folder}/clients/client_{client}.safetensors").to_dict()
             for client, entry in _client_states(plane, ref_at(plan, "client_states")).items()}
    client_states = plane.put_json(f"{folder}/client_states.json", table)
    body = {"kind": CHECKPOINT, "version": 1, "algorithm": config.pipeline.algorithm, "round": rounds_done,
            "experiment_key": experiment_key(config), "state": state.to_dict(), "history": history.to_dict(),
            "client_states": client_states.to_dict()}
    manifest = plane.put_json(f"{folder}/manifest.json", body)
    plane.put_json("checkpoints/LATEST", {"round": rounds_done, "manifest": manifest.to_dict()})
    versions = [name for name in plane.folders("checkpoints") if name.startswith("round_")]
    for stale in sorted(versions)[: max(0, len(versions) - config.keep_checkpoints)]:
        plane.delete_folder(f"checkpoints/{stale}")  # the pointer already names a newer one
    plane.write_manifest(checkpoint_out, CHECKPOINT, {**body, "step": "checkpoint", "step_round": rounds_done,
                                                      "manifest": manifest.to_dict()})
    return finite_summary({"round": rounds_done, "location": plane.uri(folder), **_io_summary(plane)})


def record(config_ref: str, shards_in: str | Path, checkpoint_in: str | Path, evaluation_in: str | Path,
           tracking_uri: str | None = None) -> str:
    """Log the experiment to its one MLflow run (created by the first segment, continued by the next).

    Only rounds the run does not hold yet are sent. The segment that finishes the experiment
    logs the personalized models, registers them as one model version and ends the run.
    """
    from pfedla.tracking import (
        FINAL_CLIENT_MEAN_METRIC,
        FINAL_METRIC,
        Tracker,
        artifact_root,
        default_tracking_uri,
    )

    config = read_config(config_ref)
    plane = data_plane(config)
    shards = plane.read_manifest(shards_in, SHARDS)
    checkpoint_manifest = plane.read_manifest(checkpoint_in, CHECKPOINT)
    manifest, evaluation, weights = _final_evaluation(plane, evaluation_in)
    rounds_done, finished = evaluation["rounds"], evaluation["rounds"] >= config.rounds
    uri = tracking_uri or default_tracking_uri(config.output_dir)
    tracker = Tracker(uri, config.experiment_name, artifact_root(uri, config.output_dir))
    name, key = config.pipeline.algorithm, experiment_key(config)
    run_id = tracker.find_run({"pfedla.experiment_key": key, "pfedla.orchestration": "kubeflow"})
    if run_id is None:
        run_id = tracker.start_run(f"{name}-pipeline", config.flat_params(), {
            "pfedla.algorithm": name, "pfedla.orchestration": "kubeflow", "pfedla.experiment_key": key,
            "pfedla.data_plane": plane.prefix})
        tracker.log_json(plane.get_json(ref_at(shards, "partition")), "partition.json")
    else:
        tracker.resume_run(run_id)
    for entry in evaluation["history"]:
        tracker.log_metrics(int(entry["round"]), {k: v for k, v in entry.items() if k != "round"})
    if weights is not None:
        context = ModelContext.of(config, shards["data"])
        tracker.log_layer_weights(weights.alpha, context.layout.names, f"round_{rounds_done:04d}",
                                  weights.raw)
    tracker.log_json(evaluation, "evaluation.json")
    tracker.log_json({k: checkpoint_manifest[k] for k in ("round", "state", "history", "manifest")},
                     f"checkpoints/round_{rounds_done:05d}.json")
    tracker.set_tags({"pfedla.rounds_done": str(rounds_done)})
    if not finished:  # the next segment continues this run
        tracker.flush()
        return run_id
    tracker.log_metrics(rounds_done, {FINAL_METRIC: evaluation["mean_accuracy"],
                                      FINAL_CLIENT_MEAN_METRIC: evaluation["client_mean_accuracy"]})
    tracker.log_bytes(plane.get_bytes(ref_at(manifest, "models")), "models/models.safetensors")
    tracker.register_models(config.pipeline.registered_model, "models")
    tracker.end_run()
    return run_id
