"""The pipeline's steps called directly: same numbers as the simulation, clear artifact errors."""

import json

import numpy as np
import pytest
import torch

from pfedla import steps, storage
from pfedla.config import config_from_dict
from pfedla.errors import ArtifactError
from pfedla.simulation import run_experiment


def config_json(tmp_path, **extra):
    raw = {"clients": 3, "rounds": 2, "device": "cpu", "output_dir": str(tmp_path / "sim"),
           "algorithms": ["pfedla"], "heur_k": 1, "participation": 0.67}
    raw.update(extra)
    return json.dumps(config_from_dict(raw).to_dict())


def configured_round_zero(tmp_path, cfg):
    """Partition, a fresh server state and round 0's client models: where client steps start."""
    shards, state, models = tmp_path / "shards", tmp_path / "state", tmp_path / "models"
    steps.partition(cfg, shards)
    steps.server_init(cfg, shards, state)
    steps.server_configure(cfg, 0, shards, state, models)
    return shards, state, models


def run_steps(tmp_path, cfg):
    shards, state = tmp_path / "shards", tmp_path / "state0"
    steps.partition(cfg, shards)
    steps.server_init(cfg, shards, state)
    for round_idx in range(2):
        models = tmp_path / f"models{round_idx}"
        clients = steps.server_configure(cfg, round_idx, shards, state, models)
        updates = []
        for client in clients:
            updates.append(tmp_path / f"update{round_idx}_{client}")
            steps.client_train(cfg, round_idx, client, shards, models, updates[-1])
        new_state = tmp_path / f"state{round_idx + 1}"
        steps.server_aggregate(cfg, round_idx, shards, state, list(reversed(updates)), new_state)
        state = new_state
    evaluation = tmp_path / "evaluation"
    steps.evaluate(cfg, shards, state, tmp_path / "final", evaluation)
    return shards, tmp_path / "final", evaluation


def test_steps_reproduce_the_simulation_exactly(tmp_path):
    cfg = config_json(tmp_path)
    _, state, evaluation = run_steps(tmp_path, cfg)
    result = json.loads((evaluation / "evaluation.json").read_text())
    simulated = run_experiment(steps.parse_config(cfg), progress=False, track=False).results["pfedla"]
    assert result["client_accuracies"] == simulated.client_accuracies
    np.testing.assert_array_equal(np.load(evaluation / "layer_weights.npy"), simulated.layer_weights)
    history = json.loads((state / "history.json").read_text())
    assert [h["round"] for h in history] == [0, 1]
    assert history[-1]["accuracy_mean"] == pytest.approx(result["mean_accuracy"])
    assert all(h["clients"] == 2.0 for h in history)  # 0.67 of 3 clients
    models, _ = storage.load_tensors(evaluation / "models.safetensors")
    assert "client2.fc2.weight" in models


def test_partition_writes_one_shard_per_client_and_stats(tmp_path):
    meta = steps.partition(config_json(tmp_path), tmp_path / "shards")
    assert meta == {"num_classes": 10, "input_shape": [1, 8, 8], "num_clients": 3}
    shard = steps.load_shard(tmp_path / "shards", 2)
    assert shard.num_train > 0 and shard.num_test > 0
    stats = json.loads((tmp_path / "shards" / "partition.json").read_text())
    assert len(stats["clients"]) == 3


def test_updates_that_do_not_fit_are_rejected_before_touching_state(tmp_path):
    cfg = config_json(tmp_path, heur_k=0, participation=1.0)
    shards, state, models = configured_round_zero(tmp_path, cfg)
    steps.client_train(cfg, 0, 1, shards, models, tmp_path / "u1")
    with pytest.raises(ArtifactError, match="for round 0, not 1"):
        steps.server_aggregate(cfg, 1, shards, state, [tmp_path / "u1"], tmp_path / "bad")
    tensors, meta = storage.load_tensors(tmp_path / "u1" / "update.safetensors")
    tensors["delta.0"] = tensors["delta.0"][:-1]
    storage.save_tensors(tmp_path / "u2" / "update.safetensors", tensors, meta)
    with pytest.raises(ArtifactError, match="does not fit the configured model"):
        steps.server_aggregate(cfg, 0, shards, state, [tmp_path / "u2"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_resume_checks_algorithm_and_round(tmp_path):
    cfg = config_json(tmp_path)
    shards, _, _ = run_steps(tmp_path, cfg)
    final = tmp_path / "final"
    resumed = config_json(tmp_path, rounds=4, pipeline={"resume_from": str(final), "start_round": 2})
    assert steps.server_init(resumed, shards, tmp_path / "resumed") == 2
    restored, _ = storage.load_tensors(tmp_path / "resumed" / "state.safetensors")
    original, _ = storage.load_tensors(final / "state.safetensors")
    assert all(torch.equal(restored[k], original[k]) for k in original)
    wrong_round = config_json(tmp_path, rounds=4, pipeline={"resume_from": str(final), "start_round": 1})
    with pytest.raises(ArtifactError, match="continues at round 2"):
        steps.server_init(wrong_round, shards, tmp_path / "r2")
    wrong_algorithm = config_json(tmp_path, rounds=4, pipeline={"resume_from": str(final), "start_round": 2,
                                                                "algorithm": "local"})
    with pytest.raises(ArtifactError, match="holds 'pfedla' state"):
        steps.server_init(wrong_algorithm, shards, tmp_path / "r3")
    other_model = config_json(tmp_path, rounds=4, model="mlp",
                              pipeline={"resume_from": str(final), "start_round": 2})
    with pytest.raises(ArtifactError, match="shape"):
        steps.server_init(other_model, shards, tmp_path / "r4")


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pfedla.errors import PfedlaError  # noqa: E402


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_tampered_server_state_is_loaded_or_rejected_with_the_project_error(tmp_path, data):
    cfg = config_json(tmp_path, heur_k=0)
    shards, state = tmp_path / "shards", tmp_path / "state"
    if not (state / "state.safetensors").is_file():
        steps.partition(cfg, shards)
        steps.server_init(cfg, shards, state)
    original = (state / "state.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(original[:8], "little")
    tampered = bytearray(original)
    for _ in range(data.draw(st.integers(1, 3))):  # mostly the header, where damage is subtle
        position = data.draw(st.integers(0, header_end + 64))
        tampered[position] = data.draw(st.integers(0, 255))
    target = tmp_path / "tampered"
    target.mkdir(exist_ok=True)
    (target / "state.safetensors").write_bytes(bytes(tampered))
    (target / "history.json").write_text("[]")
    config = steps.parse_config(cfg)
    try:
        strategy, _, _ = steps.load_state(config, steps.ModelContext.load(config, shards), target)
    except PfedlaError:
        return
    assert strategy.layer_weights().shape == (3, 4, 3)  # loaded: values may differ, shapes fit


def test_server_step_rejects_hostile_updates(tmp_path):
    cfg = config_json(tmp_path, heur_k=0, participation=1.0, max_update_norm=100.0,
                      max_failed_fraction=0.7)
    shards, state, models = configured_round_zero(tmp_path, cfg)
    for client in range(3):
        steps.client_train(cfg, 0, client, shards, models, tmp_path / f"u{client}")
    for client, factor in ((1, float("nan")), (2, 1e6)):
        path = tmp_path / f"u{client}" / "update.safetensors"
        tensors, meta = storage.load_tensors(path)
        storage.save_tensors(path, {k: v * factor for k, v in tensors.items()}, meta)
    metrics = steps.server_aggregate(cfg, 0, shards, state, [tmp_path / f"u{c}" for c in range(3)],
                                     tmp_path / "next")
    assert metrics["failed_clients"] == 2.0 and metrics["clients"] == 3.0
    after, _ = storage.load_tensors(tmp_path / "next" / "state.safetensors")
    before, _ = storage.load_tensors(state / "state.safetensors")
    assert all(torch.isfinite(t).all() for t in after.values())
    for layer in range(4):  # the rejected clients' models are untouched, the honest one moved
        assert torch.equal(after[f"models.{layer}"][1:], before[f"models.{layer}"][1:])
    assert not torch.equal(after["models.0"][0], before["models.0"][0])


def test_a_failing_client_step_reports_instead_of_failing_and_the_round_goes_on(tmp_path):
    cfg = config_json(tmp_path, heur_k=0, participation=1.0)
    shards, state, models = configured_round_zero(tmp_path, cfg)
    damaged = models / "client_1.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])  # the model the server sent arrives torn
    losses = [steps.client_train(cfg, 0, c, shards, models, tmp_path / f"u{c}") for c in range(3)]
    assert losses[1] is None and losses[0] > 0 and losses[2] > 0
    report, meta = storage.load_tensors(tmp_path / "u1" / "update.safetensors")
    assert report == {} and "client_1.safetensors is not a valid safetensors file" in meta["failed"]
    dirs = [tmp_path / f"u{c}" for c in range(3)]
    metrics = steps.server_aggregate(cfg, 0, shards, state, dirs, tmp_path / "next")
    assert metrics["failed_clients"] == 1.0 and metrics["clients"] == 3.0
    after, _ = storage.load_tensors(tmp_path / "next" / "state.safetensors")
    before, _ = storage.load_tensors(state / "state.safetensors")
    assert torch.equal(after["models.0"][1], before["models.0"][1])  # the failed client is untouched
    assert not torch.equal(after["models.0"][0], before["models.0"][0])
    with pytest.raises(ArtifactError, match=r"updates came from clients \[0, 2\], but the round selected"):
        steps.server_aggregate(cfg, 0, shards, state, [dirs[0], dirs[2]], tmp_path / "missing")
    with pytest.raises(ArtifactError, match=r"updates came from clients \[0, 0, 1, 2\]"):
        steps.server_aggregate(cfg, 0, shards, state, [dirs[0], *dirs], tmp_path / "twice")
    tensors, meta = storage.load_tensors(dirs[0] / "update.safetensors")
    for bad_count in (0, -3, 2.5, "12", True, None):  # FedAvg weights: they would reach every model
        bad = {**meta, "num_samples": bad_count}
        storage.save_tensors(tmp_path / "u8" / "update.safetensors", tensors, bad)
        with pytest.raises(ArtifactError, match="num_samples must be a positive integer"):
            steps.server_aggregate(cfg, 0, shards, state, [tmp_path / "u8", *dirs[1:]], tmp_path / "bad")
    storage.save_tensors(tmp_path / "u9" / "update.safetensors", {}, {"round": 0, "client_id": "x"})
    with pytest.raises(ArtifactError, match="u9/update.safetensors has damaged metadata"):
        steps.server_aggregate(cfg, 0, shards, state, [tmp_path / "u9"], tmp_path / "bad")
    assert not any((tmp_path / name).exists() for name in ("missing", "twice", "bad"))


def test_client_timeouts_in_the_pipeline_steps_are_failures_and_too_many_abort(tmp_path):
    from pfedla.simulation import RunAborted

    cfg = config_json(tmp_path, participation=1.0, client_timeout=1e-9)
    shards, state, models = configured_round_zero(tmp_path, cfg)
    dirs = [tmp_path / f"u{c}" for c in range(3)]
    assert [steps.client_train(cfg, 0, c, shards, models, dirs[c]) for c in range(3)] == [None] * 3
    with pytest.raises(RunAborted, match=r"round 0: 3 of 3 clients failed.*timed out: 0 of \d+ batches"):
        steps.server_aggregate(cfg, 0, shards, state, dirs, tmp_path / "next")
    assert not (tmp_path / "next").exists()


_META_VALUES = st.none() | st.booleans() | st.integers(-5, 5) | st.floats() | st.text(max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["round", "client_id", "num_samples", "train_loss", "failed",
                                        "bytes_down"]), _META_VALUES, max_size=6))
def test_random_update_metadata_is_aggregated_or_rejected_with_the_project_error(tmp_path, meta):
    """FedAvg weights by the reported sample counts, so bad counts would reach every model."""
    cfg = config_json(tmp_path, participation=1.0, max_failed_fraction=1.0, pipeline={"algorithm": "fedavg"})
    shards, state = tmp_path / "shards", tmp_path / "state"
    dirs = [tmp_path / f"u{c}" for c in range(3)]
    if not (dirs[-1] / "update.safetensors").is_file():  # examples share the trained round
        _, _, models = configured_round_zero(tmp_path, cfg)
        for client, folder in enumerate(dirs):
            steps.client_train(cfg, 0, client, shards, models, folder)
    tensors, original = storage.load_tensors(dirs[1] / "update.safetensors")
    storage.save_tensors(tmp_path / "tampered" / "update.safetensors", tensors, {**original, **meta})
    try:
        metrics = steps.server_aggregate(cfg, 0, shards, state, [dirs[0], tmp_path / "tampered", dirs[2]],
                                         tmp_path / "next")
    except PfedlaError:
        return
    assert metrics["clients"] == 3.0 and metrics["failed_clients"] in (0.0, 1.0)
    sent = {**original, **meta}
    if "failed" not in sent:  # a weight FedAvg uses was accepted: it must be a real count
        assert type(sent["num_samples"]) is int and sent["num_samples"] >= 1
    after, _ = storage.load_tensors(tmp_path / "next" / "state.safetensors")
    assert all(torch.isfinite(t).all() for t in after.values())
