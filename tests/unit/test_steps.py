"""The pipeline's steps called in-process over a local data plane: the simulation's numbers, reports
instead of crashes for bad clients, checked objects, launcher-safe summaries, checkpoints."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pfedla import steps, storage
from pfedla.config import config_from_dict
from pfedla.data import build_federated_data
from pfedla.dataplane import ObjectRef, report_key
from pfedla.errors import ArtifactError, PfedlaError
from pfedla.rounds import RunAborted
from pfedla.simulation import run_experiment

# The steps' tests run pFedLA with HeurpFedLA on 3 clients, 2 of them per round, for 2 rounds.
STEPS = {"clients": 3, "rounds": 2, "algorithms": ["pfedla"], "pfedla": {"heur_k": 1}, "participation": 0.67}


def published(config):
    """The reference the steps get, with the config written where it points (what partition does)."""
    ref = steps.config_reference(config)
    steps.publish_config(config.to_json(), ref)
    return ref


def plane_of(cfg):
    return steps.data_plane(steps.read_config(cfg))


def put_report(cfg, round_idx, group, manifest):
    """Leave ``manifest`` as the report of the pod of ``group``, where the server step reads it."""
    storage.write_bytes(plane_of(cfg).uri(report_key(round_idx, group)), json.dumps(manifest).encode())


def read(path):
    return json.loads(path.read_text())


def assert_launcher_safe(summary):
    for key, value in summary.items():
        assert isinstance(value, (str, bool, int, float)) and value is not None, key
        assert not isinstance(value, float) or math.isfinite(value), key


def start(tmp_path, cfg):
    """Partition and round 0's plan: where client steps start. Returns (shards, plan) manifests."""
    shards, plan = tmp_path / "shards.json", tmp_path / "plan0.json"
    assert_launcher_safe(steps.partition(steps.read_config(cfg).to_json(), cfg, shards))
    assert_launcher_safe(steps.server_init(cfg, shards, plan))
    return shards, plan


def train_all(tmp_path, cfg, plan, tag=""):
    """Each client of the plan in its own pod; returns the update manifests."""
    reports = []
    for client in sorted(read(plan)["clients"], key=int):
        reports.append(tmp_path / f"update{tag}_{client}.json")
        assert_launcher_safe(steps.client_train(cfg, client, plan, reports[-1]))
    return reports


def run_steps(tmp_path, cfg):
    shards, plan = start(tmp_path, cfg)
    for round_idx in range(2):
        train_all(tmp_path, cfg, plan, str(round_idx))
        next_plan = tmp_path / f"plan{round_idx + 1}.json"
        summary = steps.server_round(cfg, round_idx, round_idx == 0, shards, plan, next_plan)
        assert_launcher_safe(summary)
        plan = next_plan
    evaluation = tmp_path / "evaluation.json"
    steps.evaluate(cfg, shards, plan, tmp_path / "final-plan.json", evaluation, final=True)
    return shards, tmp_path / "final-plan.json", evaluation


def test_steps_reproduce_the_simulation_exactly(tiny_config, tmp_path):
    cfg = published(tiny_config(STEPS))
    _, final_plan, evaluation_manifest = run_steps(tmp_path, cfg)
    evaluation, weights = steps.read_evaluation(steps.read_config(cfg), evaluation_manifest)
    simulated = run_experiment(steps.read_config(cfg), progress=False, track=False).results["pfedla"]
    assert evaluation["client_accuracies"] == simulated.client_accuracies
    np.testing.assert_array_equal(weights.alpha, simulated.layer_weights)
    np.testing.assert_array_equal(weights.raw, simulated.raw_layer_weights)  # heur_k=1: both are kept
    history = evaluation["history"]
    assert [h["round"] for h in history] == [0, 1]
    assert history[-1]["accuracy_mean"] == pytest.approx(evaluation["mean_accuracy"])
    for key in ("accuracy_mean", "accuracy_client_mean"):
        assert history[-1][key] == simulated.history[-1][key], key
    assert evaluation["mean_accuracy"] == simulated.mean_accuracy
    assert evaluation["client_mean_accuracy"] == simulated.client_mean_accuracy
    assert all(h["clients"] == 2.0 for h in history)  # 0.67 of 3 clients
    for ours, theirs in zip(history, simulated.history):
        assert ours["bytes_down"] == theirs["bytes_down"] and ours["bytes_up"] == theirs["bytes_up"]
    plane = plane_of(cfg)
    models, _ = plane.get_tensors(ObjectRef.from_dict(read(evaluation_manifest)["models"], "models"))
    assert "client2.fc2.weight" in models
    assert read(final_plan)["round"] == 2 and read(final_plan)["clients"] == {}


def test_record_logs_both_final_means_and_both_alphas_to_mlflow(tiny_config, tmp_path, monkeypatch):
    """The artifacts of a local store go beside it in output_dir (on 42ac5ca: ./mlruns of wherever
    run-local was started)."""
    from mlflow.tracking import MlflowClient

    cfg = published(tiny_config(STEPS))
    shards, final_plan, evaluation_manifest = run_steps(tmp_path, cfg)
    steps.checkpoint(cfg, final_plan, tmp_path / "checkpoint.json")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run_id = steps.record(cfg, shards, tmp_path / "checkpoint.json", evaluation_manifest, uri)
    assert list(elsewhere.iterdir()) == []
    stored = (tmp_path / "out" / "mlartifacts").rglob("evaluation.json")
    assert [path.parts[-3] for path in stored] == [run_id]
    evaluation, weights = steps.read_evaluation(steps.read_config(cfg), evaluation_manifest)
    client = MlflowClient(uri)
    for metric, key in (("final_accuracy_mean", "mean_accuracy"),
                        ("final_accuracy_client_mean", "client_mean_accuracy")):
        (final,) = client.get_metric_history(run_id, metric)
        assert (final.step, final.value) == (2, evaluation[key]), metric
    for name, expected in (("layer_weights.npy", weights.alpha), ("layer_weights_raw.npy", weights.raw)):
        stored = client.download_artifacts(run_id, f"layer_weights/round_0002/{name}", str(tmp_path))
        np.testing.assert_array_equal(np.load(stored), expected)


def test_partition_stores_one_train_and_one_test_object_per_client(tiny_config, tmp_path):
    config = tiny_config(STEPS)
    cfg = steps.config_reference(config)
    summary = steps.partition(config.to_json(), cfg, tmp_path / "shards.json")
    assert summary["num_clients"] == 3 and summary["input_shape"] == "1x8x8"
    manifest = read(tmp_path / "shards.json")
    counts = [read_split(cfg, manifest, "train", c)["y"].numel() for c in range(3)]
    assert manifest["data"]["num_train"] == counts
    for client in range(3):
        train, test = (read_split(cfg, manifest, split, client) for split in ("train", "test"))
        assert set(train) == set(test) == {"x", "y"} and test["y"].numel() > 0
    built = build_federated_data(steps.read_config(cfg))  # the very tensors `pfedla run` trains on
    for client, shard in enumerate(built.shards):
        for split, x in (("train", shard.train_x), ("test", shard.test_x)):
            assert torch.equal(read_split(cfg, manifest, split, client)["x"], x)
    assert [e["uri"].rsplit("/", 1)[1] for e in manifest["train"]] == [f"client_{c}.train.safetensors"
                                                                        for c in range(3)]
    assert len(manifest["transfers"]["objects_written"]) == 7  # 3 train, 3 test, partition.json


def test_steps_get_the_config_by_reference_and_refuse_one_that_does_not_match_it(tiny_config, tmp_path):
    config = tiny_config(STEPS)
    ref = steps.config_reference(config)
    uri = json.loads(ref)["uri"]
    assert uri.startswith(str(tmp_path / "plane"))
    assert uri.endswith(f"/configs/{json.loads(ref)['sha256']}.json")
    with pytest.raises(ArtifactError, match="config_json does not match config_ref"):
        steps.partition(tiny_config(STEPS, lr=0.5).to_json(), ref, tmp_path / "shards.json")
    assert not (tmp_path / "shards.json").exists() and not Path(uri).exists()
    steps.partition(config.to_json(), ref, tmp_path / "shards.json")
    assert storage.read_bytes(uri) == config.to_json().encode()
    assert steps.read_config(ref).to_json() == config.to_json()
    storage.write_bytes(uri, storage.read_bytes(uri).replace(b'"lr": 0.', b'"lr": 1.'))  # size kept
    with pytest.raises(ArtifactError, match=r"configs/.*\.json does not match its manifest"):
        steps.server_init(ref, tmp_path / "shards.json", tmp_path / "plan.json")
    with pytest.raises(ArtifactError, match="config_ref is not JSON"):
        steps.read_config(config.to_json()[:20])
    with pytest.raises(ArtifactError, match="config_ref: not an object reference"):
        steps.read_config(config.to_json())


def read_split(cfg, manifest, split, client):
    return plane_of(cfg).get_tensors(ObjectRef.from_dict(manifest[split][client], split))[0]


def test_a_changed_object_is_refused_naming_it(tiny_config, tmp_path):
    cfg = published(tiny_config(STEPS, pfedla={"heur_k": 0}, participation=1.0,
                                pipeline={"clients_per_pod": 2}))
    shards, plan = start(tmp_path, cfg)
    model = read(plan)["clients"]["1"]["model"]["uri"]
    storage.write_bytes(model, storage.read_bytes(model)[:-4] + b"\x00\x00\x00\x00")  # same size, other bytes
    summary = steps.client_train(cfg, "0,1", plan, tmp_path / "u.json")
    assert summary == {**summary, "failed": True, "failed_clients": "1"}
    reason = read(tmp_path / "u.json")["clients"]["1"]["failed"]
    assert f"{model} does not match its manifest" in reason
    state = read(plan)["state"]["uri"]
    storage.write_bytes(state, storage.read_bytes(state) + b" ")
    with pytest.raises(ArtifactError, match="state.safetensors does not match its manifest"):
        steps.server_round(cfg, 0, True, shards, plan, tmp_path / "next.json")
    assert not (tmp_path / "next.json").exists()


def test_unusable_reports_leave_their_client_out_and_structural_errors_stop_the_round(tiny_config, tmp_path):
    cfg = published(tiny_config(STEPS, pfedla={"heur_k": 0}, participation=1.0, max_failed_fraction=1.0))
    shards, plan = start(tmp_path, cfg)
    reports = train_all(tmp_path, cfg, plan)
    # each pod's report is where the server step reads it, the same bytes as the pod's artifact
    for client, report in enumerate(reports):
        assert storage.read_bytes(plane_of(cfg).uri(report_key(0, [client]))) == report.read_bytes()
    with pytest.raises(ArtifactError, match="plans round 0, not 1"):
        steps.server_round(cfg, 1, True, shards, plan, tmp_path / "bad.json")
    put_report(cfg, 0, [1], {**read(reports[1]), "round": 1})
    with pytest.raises(ArtifactError, match="pod_from_client_1.json reports round 1, not 0"):
        steps.server_round(cfg, 0, True, shards, plan, tmp_path / "bad.json")
    put_report(cfg, 0, [1], read(reports[2]))  # pod 1's key holds pod 2's report
    with pytest.raises(ArtifactError, match=r"reports came from clients \[0, 2, 2\], but the round selected"):
        steps.server_round(cfg, 0, True, shards, plan, tmp_path / "bad.json")
    storage.delete(plane_of(cfg).uri(report_key(0, [1])))  # the pod never wrote one
    with pytest.raises(PfedlaError, match="cannot read .*/rounds/00000/reports/pod_from_client_1.json"):
        steps.server_round(cfg, 0, True, shards, plan, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()

    plane = plane_of(cfg)
    manifest = read(reports[1])
    delta, _ = plane.get_tensors(ObjectRef.from_dict(manifest["clients"]["1"]["update"], "update"))
    delta["delta.0"] = delta["delta.0"][:-1]
    wrong_shape = plane.put_tensors("forged/client_1.safetensors", delta).to_dict()
    honest, _ = plane.get_tensors(ObjectRef.from_dict(manifest["clients"]["1"]["update"], "update"))
    huge = plane.put_tensors("forged/huge_1.safetensors", {k: v * 1e6 for k, v in honest.items()}).to_dict()
    lies = {
        "shape": {**manifest["clients"]["1"], "update": wrong_shape},
        "samples": {**manifest["clients"]["1"], "num_samples": 10**12},  # FedAvg would follow the liar
        "ref": {**manifest["clients"]["1"], "update": {"uri": "x"}},
        "state": {**manifest["clients"]["1"], "state": {"uri": "x"}},  # not a reference to its state
        "huge": {**manifest["clients"]["1"], "update": huge},  # finite, caught by update_norm_ratio
        "type": "not a report",
    }
    for lie, report in lies.items():
        put_report(cfg, 0, [1], {**manifest, "clients": {"1": report}})
        metrics_plan = tmp_path / f"next-{lie}.json"
        steps.server_round(cfg, 0, True, shards, plan, metrics_plan)
        history = plane.get_json(ObjectRef.from_dict(read(metrics_plan)["history"], "history"))
        assert history[-1]["failed_clients"] == 1.0, lie


def test_resume_checks_algorithm_and_round(tiny_config, tmp_path):
    cfg = published(tiny_config(STEPS))
    shards, final_plan, _ = run_steps(tmp_path, cfg)
    saved = tmp_path / "checkpoint.json"
    steps.checkpoint(cfg, final_plan, saved)
    plane_root = str(tmp_path / "plane")
    resumed = published(tiny_config(STEPS, rounds=4, pipeline={"data_root": plane_root, "start_round": 2}))
    steps.server_init(resumed, shards, tmp_path / "resumed.json")
    assert read(tmp_path / "resumed.json")["state"] == read(saved)["state"]  # used where it is, not copied
    folder = read(saved)["state"]["uri"].rsplit("/", 1)[0]
    wrong_round = published(tiny_config(STEPS, rounds=4, pipeline={"data_root": plane_root, "start_round": 1,
                                                            "resume_from": folder}))
    with pytest.raises(ArtifactError, match="continues at round 2, but pipeline.start_round is 1"):
        steps.server_init(wrong_round, shards, tmp_path / "r2.json")
    wrong_algorithm = published(tiny_config(STEPS, rounds=4, pipeline={"data_root": plane_root,
                                                                "start_round": 2, "resume_from": folder,
                                                                "algorithm": "local"}))
    with pytest.raises(ArtifactError, match="holds 'pfedla' state"):
        steps.server_init(wrong_algorithm, shards, tmp_path / "r3.json")
    missing = published(tiny_config(STEPS, rounds=4, pipeline={"data_root": plane_root, "start_round": 3}))
    with pytest.raises(storage.StorageError, match="checkpoints/round_00003/manifest.json"):
        steps.server_init(missing, shards, tmp_path / "r4.json")


def test_checkpoints_are_versioned_and_the_pointer_moves_last(tiny_config, tmp_path, monkeypatch):
    cfg = published(tiny_config(STEPS, keep_checkpoints=2,
                      pipeline={"data_root": str(tmp_path / "plane"), "keep_rounds": 3}))
    _, final_plan, _ = run_steps(tmp_path, cfg)
    for earlier in ("plan0.json", "plan1.json"):  # segments ending after rounds 0 and 1
        steps.checkpoint(cfg, tmp_path / earlier, tmp_path / f"checkpoint-{earlier}")
    assert plane_of(cfg).folders("checkpoints") == ["round_00000", "round_00001"]
    writes = []
    real_write = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda location, data: (writes.append(str(location)),
                                                                        real_write(location, data)))
    summary = steps.checkpoint(cfg, final_plan, tmp_path / "checkpoint.json")
    assert summary["location"].endswith("checkpoints/round_00002")
    assert [w.rsplit("/", 2)[-2:] for w in writes] == [
        ["round_00002", "client_states.json"], ["round_00002", "manifest.json"], ["checkpoints", "LATEST"],
        [tmp_path.name, "checkpoint.json"]]
    plane = plane_of(cfg)
    latest = plane.get_json(ObjectRef.from_dict({**read(tmp_path / "checkpoint.json")["manifest"]}, "m"))
    assert latest["round"] == 2
    state, _ = plane.get_tensors(ObjectRef.from_dict(latest["state"], "state"))
    assert "models.0" in state
    assert read(tmp_path / "checkpoint.json")["transfers"]["copied_bytes"] > 0  # the store copied the state
    assert plane_of(cfg).folders("checkpoints") == ["round_00001", "round_00002"]  # keep_checkpoints=2


def test_old_rounds_are_deleted_but_never_the_inputs_of_a_retried_step(tiny_config, tmp_path):
    cfg = published(tiny_config(STEPS, rounds=3, participation=1.0,
                                pipeline={"data_root": str(tmp_path / "plane"), "keep_rounds": 1}))
    shards, plan = start(tmp_path, cfg)
    for round_idx in range(3):
        train_all(tmp_path, cfg, plan, str(round_idx))
        next_plan = tmp_path / f"plan{round_idx + 1}.json"
        steps.server_round(cfg, round_idx, round_idx < 2, shards, plan, next_plan)
        rounds_dir = plane_of(cfg).uri("rounds")
        kept = sorted(p.name for p in Path(rounds_dir).iterdir())
        assert kept == [f"{r:05d}" for r in range(max(0, round_idx), round_idx + 2)]
        # retrying the step (its pod died after writing) finds its inputs and writes the same outputs
        steps.server_round(cfg, round_idx, round_idx < 2, shards, plan, tmp_path / "retry.json")
        assert read(tmp_path / "retry.json")["state"] == read(next_plan)["state"]
        plan = next_plan


def test_a_diverging_client_is_reported_and_its_summary_stays_finite(tiny_config, tmp_path, monkeypatch):
    every_client_diverges = {"lr": 5e4}
    cfg = published(tiny_config(STEPS, every_client_diverges, pfedla={"heur_k": 0}, participation=1.0))
    shards, plan = start(tmp_path, cfg)
    summary = steps.client_train(cfg, "0,1,2", plan, tmp_path / "u.json")
    assert_launcher_safe(summary)
    reports = read(tmp_path / "u.json")["clients"]
    for report in reports.values():  # no NaN token anywhere: the manifest is strict JSON
        assert "failed" in report or math.isfinite(report.get("train_loss", 0.0))
    assert any("NaN or Inf" in r.get("failed", "") for r in reports.values())


def test_client_timeouts_in_the_pipeline_steps_are_failures_and_too_many_abort(tiny_config, tmp_path):
    cfg = published(tiny_config(STEPS, participation=1.0, client_timeout=1e-9,
                                pipeline={"clients_per_pod": 3}))
    shards, plan = start(tmp_path, cfg)
    assert steps.client_train(cfg, "0,1,2", plan, tmp_path / "u.json")["failed_clients"] == "0,1,2"
    with pytest.raises(RunAborted, match=r"round 0: 3 of 3 clients failed.*timed out: 0 of \d+ batches"):
        steps.server_round(cfg, 0, True, shards, plan, tmp_path / "next.json")
    assert not (tmp_path / "next.json").exists()


def test_a_client_group_not_in_the_plan_is_refused(tiny_config, tmp_path):
    cfg = published(tiny_config(STEPS, participation=1.0))
    _, plan = start(tmp_path, cfg)
    with pytest.raises(ArtifactError, match=r"clients \[7\] are not part of round 0's plan"):
        steps.client_train(cfg, "0,7", plan, tmp_path / "u.json")
    with pytest.raises(ArtifactError, match="not a client group"):
        steps.client_train(cfg, "0;1", plan, tmp_path / "u.json")


_META_VALUES = st.none() | st.booleans() | st.integers(-5, 5) | st.floats() | st.text(max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["num_samples", "train_loss", "failed", "update"]), _META_VALUES,
                       max_size=4))
def test_random_reports_are_aggregated_or_left_out_and_the_state_stays_finite(tiny_config, tmp_path, fields):
    """FedAvg weights by the reported sample counts, so bad counts would reach every model."""
    cfg = published(tiny_config(STEPS, participation=1.0, max_failed_fraction=1.0, pfedla={"heur_k": 0},
                      pipeline={"algorithm": "fedavg", "data_root": str(tmp_path / "plane"),
                                "clients_per_pod": 3}))
    if not (tmp_path / "reports.json").is_file():  # examples share the trained round
        shards, plan = start(tmp_path, cfg)
        steps.client_train(cfg, "0,1,2", plan, tmp_path / "reports.json")
    manifest = read(tmp_path / "reports.json")
    manifest["clients"]["1"] = {**manifest["clients"]["1"], **fields}
    put_report(cfg, 0, [0, 1, 2], manifest)
    try:
        summary = steps.server_round(cfg, 0, False, tmp_path / "shards.json", tmp_path / "plan0.json",
                                     tmp_path / "next.json")
    except PfedlaError:
        return
    assert_launcher_safe(summary)
    assert summary["clients"] == 3 and summary["failed_clients"] in (0, 1)
    plane = plane_of(cfg)
    state, _ = plane.get_tensors(ObjectRef.from_dict(read(tmp_path / "next.json")["state"], "state"))
    assert all(torch.isfinite(t).all() for t in state.values())
    if summary["failed_clients"] == 0:  # a weight FedAvg uses was accepted: it is the real count
        known = read(tmp_path / "shards.json")["data"]["num_train"][1]
        assert manifest["clients"]["1"]["num_samples"] == known


def test_fedprox_through_the_steps_equals_the_simulation(tiny_config, tmp_path):
    """The proximal coefficient travels with each client's start model to the client step."""
    cfg = published(tiny_config(STEPS, algorithms=["fedprox"], fedprox={"mu": 0.5},
                      pipeline={"data_root": str(tmp_path / "plane"), "algorithm": "fedprox"}))
    _, _, evaluation_manifest = run_steps(tmp_path, cfg)
    evaluation, _ = steps.read_evaluation(steps.read_config(cfg), evaluation_manifest)
    simulated = run_experiment(steps.read_config(cfg), progress=False, track=False).results["fedprox"]
    assert evaluation["client_accuracies"] == simulated.client_accuracies
    plain = config_from_dict({**steps.read_config(cfg).to_dict(), "fedprox": {"mu": 0.0},
                              "output_dir": str(tmp_path / "f")})
    without_mu = run_experiment(plain, progress=False, track=False).results["fedprox"]
    assert [h["train_loss"] for h in without_mu.history] != [h["train_loss"] for h in simulated.history]


@pytest.mark.parametrize("name", ["fedavg", "pfedla_frozen", "fedavg_ft", "fedper", "fedrep", "fedbn",
                                  "ditto", "local"])
def test_every_baseline_through_the_steps_equals_the_simulation_and_keeps_its_private_layers_home(tiny_config,
        tmp_path, name):
    """Client state (private layers, BatchNorm statistics, Ditto's personal model) lives in client-owned
    objects that the server step never reads; start models and updates leave the private layers out."""
    cfg = published(tiny_config(STEPS, algorithms=[name], model="cnn_bn", pfedla={"heur_k": 0},
                      fedper={"personal_layers": 2}, fedrep={"personal_layers": 2},
                      pipeline={"data_root": str(tmp_path / "plane"), "algorithm": name}))
    _, final_plan, evaluation_manifest = run_steps(tmp_path, cfg)
    evaluation, _ = steps.read_evaluation(steps.read_config(cfg), evaluation_manifest)
    simulated = run_experiment(steps.read_config(cfg), progress=False, track=False).results[name]
    assert evaluation["client_accuracies"] == simulated.client_accuracies
    for ours, theirs in zip(evaluation["history"], simulated.history, strict=True):
        assert (ours["bytes_down"], ours["bytes_up"]) == (theirs["bytes_down"], theirs["bytes_up"])
    plane = plane_of(cfg)
    private = {"fedper": {4, 5}, "fedrep": {4, 5}, "fedbn": {1, 3}, "local": set(range(6))}.get(name, set())
    plan = read(tmp_path / "plan1.json")
    for entry in plan["clients"].values():  # round 1's start models
        model, _ = plane.get_tensors(ObjectRef.from_dict(entry["model"], "model"))
        assert {int(key.split(".")[1]) for key in model} == set(range(6)) - private
    returning = [entry for entry in plan["clients"].values() if "state" in entry]
    assert returning  # 2 of 3 clients a round: one trained in round 0 too and has a state
    for entry in returning:
        state, _ = plane.get_tensors(ObjectRef.from_dict(entry["state"], "state"))
        assert {int(k.split(".")[1]) for k in state if k.startswith("layer.")} == private
        assert "buffer.bn1.running_mean" in state
    reports = [read(path) for path in sorted(tmp_path.glob("update1_*.json"))]
    for report in (r for m in reports for r in m["clients"].values()):
        delta, _ = plane.get_tensors(ObjectRef.from_dict(report["update"], "update"))
        assert {int(key.split(".")[1]) for key in delta} == set(range(6)) - private
    # A segment boundary: the checkpoint carries copies of the client states.
    steps.checkpoint(cfg, final_plan, tmp_path / "checkpoint.json")
    table = plane.get_json(ObjectRef.from_dict(read(tmp_path / "checkpoint.json")["client_states"], "table"))
    assert sorted(table, key=int) == ["0", "1", "2"]
    assert all("checkpoints/round_00002" in entry["uri"] for entry in table.values())


def test_pfedhn_through_the_steps_equals_the_simulation(tiny_config, tmp_path):
    """The hypernetwork and both Adam states travel in the server state; clients need nothing new."""
    cfg = published(tiny_config(STEPS, algorithms=["pfedhn"], pipeline={"data_root": str(tmp_path / "plane"),
                                                                 "algorithm": "pfedhn"}))
    _, _, evaluation_manifest = run_steps(tmp_path, cfg)
    evaluation, weights = steps.read_evaluation(steps.read_config(cfg), evaluation_manifest)
    simulated = run_experiment(steps.read_config(cfg), progress=False, track=False).results["pfedhn"]
    assert evaluation["client_accuracies"] == simulated.client_accuracies
    assert [h["train_loss"] for h in evaluation["history"]] == [h["train_loss"] for h in simulated.history]
    assert weights is None  # no α: pFedHN generates whole models


@pytest.mark.parametrize(("algorithm", "section"), [("ditto", {"ditto": {"lam": 1e30}}),
                                                    ("pfedla", {"pfedla": {"hn_lr": 1e30}})])
def test_a_diverging_pipeline_stops_naming_algorithm_seed_and_round(tiny_config, tmp_path, algorithm,
                                                                    section):
    """Issue 21, case 9 in the pipeline's steps: on 42ac5ca the evaluation step scored NaN models 0.0.
    A step stops at the diverged state: its own check (algorithm, seed, round), or the next step's
    refusal to load a stored tensor that is NaN, Inf or beyond 1e18 (naming object and tensor)."""
    cfg = published(tiny_config(STEPS, section, algorithms=[algorithm], pipeline={"algorithm": algorithm}))
    with pytest.raises(PfedlaError) as stopped:
        run_steps(tmp_path, cfg)
    message = str(stopped.value)
    refused = r"state tensor '\S+' holds (NaN or Inf|values beyond 1e\+18 in magnitude)$"
    assert re.match(rf"{algorithm}, seed 0, round [01]: .+ became non-finite", message) or \
        re.search(refused, message), message


def test_a_client_state_object_with_non_finite_values_leaves_that_client_out_naming_the_tensor(tiny_config,
                                                                                               tmp_path):
    """Issue 21, case 8 in the pipeline: a client's own state object is checked like a checkpoint's
    tensors (on 42ac5ca a NaN in Ditto's personal model was trained and evaluated as accuracy 0)."""
    cfg = published(tiny_config(STEPS, algorithms=["ditto"], pipeline={"algorithm": "ditto"}))
    shards, plan = start(tmp_path, cfg)
    train_all(tmp_path, cfg, plan)
    steps.server_round(cfg, 0, True, shards, plan, tmp_path / "plan1.json")
    plan1 = read(tmp_path / "plan1.json")
    client, entry = next((c, e) for c, e in sorted(plan1["clients"].items()) if "state" in e)
    plane = plane_of(cfg)
    tensors, _ = plane.get_tensors(ObjectRef.from_dict(entry["state"], "state"))
    tensors["personal.0"] = torch.full_like(tensors["personal.0"], math.nan)
    tampered = plane.put_tensors(f"clients/client_{client}/tampered/state.safetensors", tensors)
    entry["state"] = tampered.to_dict()
    (tmp_path / "plan1.json").write_text(json.dumps(plan1))
    summary = steps.client_train(cfg, client, tmp_path / "plan1.json", tmp_path / "u1.json")
    assert summary["failed_clients"] == client
    reason = read(tmp_path / "u1.json")["clients"][client]["failed"]
    assert f"{tampered.uri}: state tensor 'personal.0' holds NaN or Inf" in reason
