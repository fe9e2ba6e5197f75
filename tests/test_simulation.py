"""The in-process round loop: output contracts, tracking to the default sqlite store, determinism,
and the default experiment's headline result."""

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pfedla import storage
from pfedla.config import config_from_dict
from pfedla.data.federated import class_overlap
from pfedla.simulation import format_table, participants, run_experiment


def small_config(tmp_path, **extra):
    raw = {"clients": 4, "rounds": 3, "output_dir": str(tmp_path / "out"), "heatmap_every": 2,
           "algorithms": ["pfedla", "fedavg", "local"], "device": "cpu"}
    raw.update(extra)
    return config_from_dict(raw)


def test_outputs_follow_the_contract_and_are_tracked(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = small_config(tmp_path)
    outcome = run_experiment(config, progress=False)
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["pfedla", "fedavg", "local"]
    for entry in summary.values():
        assert len(entry["client_accuracies"]) == 4 and entry["rounds"] == 3 and entry["wall_seconds"] > 0
        assert 0.0 <= entry["mean_accuracy"] <= 1.0
    partition = json.loads((out / "partition.json").read_text())["clients"]
    assert len(partition) == 4 and all(len(c["train"]) == 10 for c in partition)
    alpha = np.load(out / "layer_weights.npy")
    assert alpha.shape == (4, 4, 4)  # client, layer (conv1, conv2, fc1, fc2), source client
    np.testing.assert_allclose(alpha.sum(-1), 1.0, rtol=1e-5)
    models, meta = storage.load_tensors(out / "models" / "pfedla.safetensors")
    assert meta["algorithm"] == "pfedla" and "client3.fc2.bias" in models

    assert outcome.tracking_uri == f"sqlite:///{out.resolve()}/mlflow.db"
    client = MlflowClient(outcome.tracking_uri)
    run = client.get_run(summary["pfedla"]["mlflow_run_id"])
    assert run.data.params["clients"] == "4" and run.data.params["partition.kind"] == "pathological"
    history = client.get_metric_history(run.info.run_id, "accuracy_mean")
    assert [m.step for m in history] == [0, 1, 2]
    for name in ("bytes_down", "bytes_up", "round_seconds", "alpha_entropy", "alpha_self_weight",
                 "failed_clients", "accuracy_min", "accuracy_max", "loss_mean"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 3, name
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "layer_weights")}
    assert artifacts == {"layer_weights/round_0002", "layer_weights/round_0003"}
    final = {a.path for a in client.list_artifacts(run.info.run_id, "layer_weights/round_0003")}
    assert "layer_weights/round_0003/layer_weights.npy" in final
    assert sum(p.endswith(".png") for p in final) == 4
    assert {a.path for a in client.list_artifacts(run.info.run_id, "models")} == {"models/pfedla.safetensors"}
    assert "pfedla" in format_table(outcome.results)


def test_tracking_uri_from_the_environment_wins(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    outcome = run_experiment(small_config(tmp_path, rounds=1, algorithms=["local"]), progress=False)
    assert outcome.tracking_uri == uri and (tmp_path / "elsewhere.db").is_file()
    assert not (tmp_path / "out" / "mlflow.db").exists()


def test_same_seed_same_numbers_and_shared_client_schedule(tmp_path):
    config = small_config(tmp_path, participation=0.5, rounds=4)
    first = run_experiment(config, progress=False, track=False)
    second = run_experiment(config, progress=False, track=False)
    for name in config.algorithms:
        assert first.results[name].client_accuracies == second.results[name].client_accuracies
    schedule = [participants(config, r) for r in range(4)]
    assert all(len(s) == 2 for s in schedule) and len({tuple(s) for s in schedule}) > 1


def test_heurpfedla_sends_fewer_bytes(tmp_path):
    plain = run_experiment(small_config(tmp_path, algorithms=["pfedla"]), progress=False, track=False)
    heur = run_experiment(small_config(tmp_path, algorithms=["pfedla"], heur_k=2), progress=False,
                          track=False)
    down_plain = plain.results["pfedla"].history[0]["bytes_down"]
    down_heur = heur.results["pfedla"].history[0]["bytes_down"]
    assert 0 < down_heur < down_plain
    assert heur.results["pfedla"].history[0]["bytes_up"] == plain.results["pfedla"].history[0]["bytes_up"]


@pytest.mark.integration
def test_default_experiment_pfedla_beats_baselines_and_trusts_class_sharing_clients(tmp_path):
    """The README's headline table: pathological 2 classes per client on digits."""
    config = config_from_dict({"output_dir": str(tmp_path / "default"), "device": "cpu"})
    outcome = run_experiment(config, progress=False, track=False)
    accuracy = {name: r.mean_accuracy for name, r in outcome.results.items()}
    assert accuracy["pfedla"] >= accuracy["local"]
    assert accuracy["pfedla"] > accuracy["fedavg"] + 0.05
    counts = json.loads((tmp_path / "default" / "partition.json").read_text())["clients"]
    share = class_overlap(counts)
    others = ~np.eye(len(counts), dtype=bool)
    alpha = outcome.results["pfedla"].layer_weights
    preferred = [alpha[:, layer][share & others].mean() > alpha[:, layer][~share].mean()
                 for layer in range(alpha.shape[1])]
    assert sum(preferred) > len(preferred) / 2
