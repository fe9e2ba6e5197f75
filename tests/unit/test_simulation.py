"""The in-process round loop: output contracts, tracking to the default sqlite store, determinism,
and the default experiment's headline result."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pfedla import storage
from pfedla.cli import main
from pfedla.client import EvalResult
from pfedla.config import config_from_dict
from pfedla.results import AlgorithmResult, experiment_summary, format_table
from pfedla.rounds import RunAborted, accuracy_metrics, participants
from pfedla.simulation import run_experiment

SIM = {"heatmap_every": 2}  # α heatmaps every other round of the tiny experiment


def test_outputs_follow_the_contract_and_are_tracked(tiny_config, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tiny_config(SIM)
    outcome = run_experiment(config, progress=False)
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["pfedla", "fedavg", "local"]
    for entry in summary.values():
        (seed_entry,) = entry["seeds"].values()  # one seed: the experiment's numbers are that seed's
        assert list(entry["seeds"]) == ["0"] and entry["mean_accuracy_std"] is None
        assert len(seed_entry["client_accuracies"]) == 4 and entry["rounds"] == 3
        assert entry["wall_seconds"] == seed_entry["wall_seconds"] > 0
        assert 0.0 <= entry["mean_accuracy"] == seed_entry["mean_accuracy"] <= 1.0
        assert entry["client_mean_accuracy"] == pytest.approx(np.mean(seed_entry["client_accuracies"]))
    seed = out / "seed_0"
    partition = json.loads((seed / "partition.json").read_text())["clients"]
    assert len(partition) == 4 and all(len(c["train"]) == 10 for c in partition)
    alpha = np.load(seed / "layer_weights.npy")
    assert alpha.shape == (4, 4, 4)  # client, layer (conv1, conv2, fc1, fc2), source client
    np.testing.assert_allclose(alpha.sum(-1), 1.0, rtol=1e-5)
    assert not (seed / "layer_weights_raw.npy").exists()  # heur_k = 0: nothing masked, no second copy
    models, meta = storage.load_tensors(seed / "models" / "pfedla.safetensors")
    assert meta["algorithm"] == "pfedla" and "client3.fc2.bias" in models
    assert (out / "report.md").is_file() and (out / "figures" / "accuracy.png").is_file()

    assert outcome.tracking_uri == f"sqlite:///{out.resolve()}/mlflow.db"
    client = MlflowClient(outcome.tracking_uri)
    run = client.get_run(summary["pfedla"]["seeds"]["0"]["mlflow_run_id"])
    assert run.data.params["clients"] == "4" and run.data.params["partition.kind"] == "pathological"
    history = client.get_metric_history(run.info.run_id, "accuracy_mean")
    assert [m.step for m in history] == [0, 1, 2]
    for name in ("bytes_down", "bytes_up", "round_seconds", "alpha_entropy", "alpha_self_weight",
                 "failed_clients", "accuracy_client_mean", "accuracy_min", "accuracy_max", "loss_mean"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 3, name
    for metric, key in (("final_accuracy_mean", "mean_accuracy"),
                        ("final_accuracy_client_mean", "client_mean_accuracy")):
        (final_metric,) = client.get_metric_history(run.info.run_id, metric)
        assert (final_metric.step, final_metric.value) == (3, summary["pfedla"][key]), metric
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "layer_weights")}
    assert artifacts == {"layer_weights/round_0002", "layer_weights/round_0003"}
    final = {a.path for a in client.list_artifacts(run.info.run_id, "layer_weights/round_0003")}
    assert "layer_weights/round_0003/layer_weights.npy" in final
    assert "layer_weights/round_0003/layer_weights_raw.npy" not in final
    assert sum(p.endswith(".png") for p in final) == 4
    assert {a.path for a in client.list_artifacts(run.info.run_id, "models")} == {"models/pfedla.safetensors"}
    assert "pfedla" in format_table(outcome.summary)


def test_sample_weighted_and_client_mean_accuracies_follow_their_definitions():
    """Clients with unequal test sizes: the two means differ, and each is what its name says."""
    results = [EvalResult(correct=9, loss_sum=2.0, count=10), EvalResult(correct=1, loss_sum=3.0, count=4),
               EvalResult(correct=30, loss_sum=1.0, count=40)]
    metrics = accuracy_metrics(results)
    per_client = [r.correct / r.count for r in results]
    weighted = sum(r.correct for r in results) / sum(r.count for r in results)
    assert metrics["accuracy_mean"] == pytest.approx(weighted)
    assert metrics["accuracy_client_mean"] == pytest.approx(sum(per_client) / len(per_client))
    assert abs(metrics["accuracy_mean"] - metrics["accuracy_client_mean"]) > 0.01
    result = AlgorithmResult("local", per_client, metrics["accuracy_mean"], rounds=1, wall_seconds=1.0)
    assert result.client_mean_accuracy == metrics["accuracy_client_mean"]
    summary = result.summary()
    assert (summary["mean_accuracy"], summary["client_mean_accuracy"]) == (
        metrics["accuracy_mean"], metrics["accuracy_client_mean"])
    header, _, row, legend = format_table(experiment_summary({0: {"local": result}}, ["local"])).splitlines()
    assert header.split()[1:3] == ["sample", "acc"] and "client acc" in header
    assert row.split()[1:3] == [f"{weighted:.4f}", f"{sum(per_client) / len(per_client):.4f}"]
    assert "weighted by test size" in legend and "unweighted" in legend


def test_tracking_uri_from_the_environment_wins(tiny_config, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    outcome = run_experiment(tiny_config(SIM, rounds=1, algorithms=["local"]), progress=False)
    assert outcome.tracking_uri == uri and (tmp_path / "elsewhere.db").is_file()
    assert not (tmp_path / "out" / "mlflow.db").exists()


def test_same_seed_same_numbers_and_shared_client_schedule(tiny_config, tmp_path):
    config = tiny_config(SIM, participation=0.5, rounds=4)
    first = run_experiment(config, progress=False, track=False)
    second = run_experiment(config, progress=False, track=False, overwrite=True)
    for name in config.algorithms:
        assert first.results[name].client_accuracies == second.results[name].client_accuracies
    schedule = [participants(config, r) for r in range(4)]
    assert all(len(s) == 2 for s in schedule) and len({tuple(s) for s in schedule}) > 1


def test_heurpfedla_sends_fewer_bytes(tiny_config, tmp_path):
    plain = run_experiment(tiny_config(SIM, algorithms=["pfedla"]), progress=False, track=False)
    heur = run_experiment(tiny_config(SIM, algorithms=["pfedla"], pfedla={"heur_k": 2}), progress=False,
                          track=False, overwrite=True)
    down_plain = plain.results["pfedla"].history[0]["bytes_down"]
    down_heur = heur.results["pfedla"].history[0]["bytes_down"]
    assert 0 < down_heur < down_plain
    assert heur.results["pfedla"].history[0]["bytes_up"] == plain.results["pfedla"].history[0]["bytes_up"]


def test_heurpfedla_records_the_hypernetworks_alpha_beside_the_masked_one(tiny_config, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    outcome = run_experiment(tiny_config(SIM, algorithms=["pfedla"], pfedla={"heur_k": 1}, rounds=2),
                             progress=False)
    result, out = outcome.results["pfedla"], tmp_path / "out"
    masked, raw = (np.load(out / "seed_0" / name) for name in ("layer_weights.npy", "layer_weights_raw.npy"))
    np.testing.assert_array_equal(masked, result.layer_weights)
    np.testing.assert_array_equal(raw, result.raw_layer_weights)
    assert raw.shape == masked.shape == (4, 4, 4)
    np.testing.assert_allclose(raw.sum(-1), 1.0, rtol=1e-5)
    differs = (raw != masked).any(-1)  # [client, layer]: exactly the one layer each client kept local
    assert (differs.sum(1) == 1).all()
    kept = differs.argmax(1)
    np.testing.assert_array_equal(masked[np.arange(4), kept], np.eye(4))
    client = MlflowClient(outcome.tracking_uri)
    stored = client.download_artifacts(result.run_id, "layer_weights/round_0002/layer_weights_raw.npy",
                                       str(tmp_path))
    np.testing.assert_array_equal(np.load(stored), raw)


def test_failing_and_hostile_clients_are_left_out_without_touching_honest_ones(tmp_path, monkeypatch, caplog):
    """Fault injection: a wrapper around the real client training misbehaves for chosen clients."""
    import logging

    from pfedla import simulation

    real_fit = simulation.fit_client

    def misbehaving(kinds):
        def fit(*args):
            update, state = real_fit(*args)
            kind = kinds.get(update.client_id)
            if kind == "raise":
                raise RuntimeError("client 1 lost its GPU")
            if kind == "nan":
                update.delta[0][0] = float("nan")
            if kind == "huge":
                update.delta = [d * 1e6 for d in update.delta]
            return update, state
        return fit

    raw = {"clients": 6, "rounds": 3, "device": "cpu", "algorithms": ["pfedla", "fedavg"],
           "max_update_norm": 1000.0, "output_dir": str(tmp_path / "out")}
    monkeypatch.setattr(simulation, "fit_client", misbehaving({1: "raise", 2: "nan", 3: "huge"}))
    with caplog.at_level(logging.WARNING, logger="pfedla"):
        hostile = run_experiment(config_from_dict(raw), progress=False, track=False)
    assert "client 1 left out: training raised RuntimeError: client 1 lost its GPU" in caplog.text
    assert "client 2 left out: update has NaN or Inf values" in caplog.text
    assert "client 3 left out: update L2 norm" in caplog.text and "exceeds max_update_norm" in caplog.text
    for result in hostile.results.values():
        assert [h["failed_clients"] for h in result.history] == [3.0, 3.0, 3.0]
        assert all(np.isfinite(result.client_accuracies))
    # The same clients simply absent (every attempt raises): honest clients see exactly the same.
    monkeypatch.setattr(simulation, "fit_client", misbehaving({1: "raise", 2: "raise", 3: "raise"}))
    absent = run_experiment(config_from_dict(raw), progress=False, track=False, overwrite=True)
    honest = [0, 4, 5]
    for name in raw["algorithms"]:  # tolerance: exact equality
        assert [hostile.results[name].client_accuracies[i] for i in honest] == \
            [absent.results[name].client_accuracies[i] for i in honest]
    # With both norm limits off the huge update gets through and poisons every client's next round.
    monkeypatch.setattr(simulation, "fit_client", misbehaving({3: "huge"}))
    unguarded = config_from_dict({**raw, "max_update_norm": None, "update_norm_ratio": None,
                                  "algorithms": ["fedavg"]})
    with pytest.raises(RunAborted, match="round 1: 6 of 6 clients failed.*NaN or Inf"):
        run_experiment(unguarded, progress=False, track=False, overwrite=True)
    # With the defaults (no absolute limit, the relative one on) it is left out every round and
    # the run ends as if client 3 had been absent.
    defaults = {k: v for k, v in raw.items() if k != "max_update_norm"} | {"algorithms": ["fedavg"]}
    with caplog.at_level(logging.WARNING, logger="pfedla"):
        guarded = run_experiment(config_from_dict(defaults), progress=False, track=False,
                                 overwrite=True).results["fedavg"]
    assert "client 3 left out: update L2 norm" in caplog.text and "update_norm_ratio=100" in caplog.text
    assert [h["failed_clients"] for h in guarded.history] == [1.0, 1.0, 1.0]
    monkeypatch.setattr(simulation, "fit_client", misbehaving({3: "raise"}))
    without_3 = run_experiment(config_from_dict(defaults), progress=False, track=False,
                               overwrite=True).results["fedavg"]
    assert guarded.client_accuracies == without_3.client_accuracies  # tolerance: exact equality


def test_too_many_failures_abort_with_a_clear_error_and_keep_the_last_checkpoint(tmp_path, monkeypatch):
    from pfedla import simulation
    from pfedla.checkpoint import CheckpointStore

    real_fit = simulation.fit_client

    def fails_from_round_two(*args):
        round_idx, client_id = args[-2:]
        if round_idx >= 2 and client_id != 0:
            raise ValueError("disk full")
        return real_fit(*args)

    monkeypatch.setattr(simulation, "fit_client", fails_from_round_two)
    config = config_from_dict({"clients": 4, "rounds": 4, "device": "cpu", "algorithms": ["pfedla"],
                               "output_dir": str(tmp_path / "out")})
    with pytest.raises(RunAborted, match="round 2: 3 of 4 clients failed.*disk full"):
        run_experiment(config, progress=False, track=False)
    identity = json.loads((tmp_path / "out" / "run.json").read_text())["identity"]
    store = CheckpointStore(tmp_path / "out" / "checkpoints" / "rounds", keep=3, run=f"{identity}/seed_0")
    latest = store.latest("pfedla")
    assert latest.rounds_done == 2


def test_a_client_past_client_timeout_is_left_out_like_an_absent_one(tmp_path, monkeypatch, caplog):
    """Fault injection: a forward hook makes every batch of client 2 take 7 s; the limit is 6 s, so
    honest clients (18 batches in well under a second alone) keep a wide margin on a loaded machine
    (one took 3.1 s while other test suites shared the 2 cores)."""
    import logging
    import time

    from pfedla import simulation

    real_fit = simulation.fit_client

    def fit(slow_or_absent):
        def fit_client(rule, trainer, *args):
            if args[-1] != 2:
                return real_fit(rule, trainer, *args)
            if slow_or_absent == "absent":
                raise RuntimeError("absent")
            hook = trainer.model.register_forward_pre_hook(lambda *_: time.sleep(7.0))
            try:
                return real_fit(rule, trainer, *args)
            finally:
                hook.remove()
        return fit_client

    raw = {"clients": 4, "rounds": 2, "device": "cpu", "algorithms": ["pfedla"], "client_timeout": 6.0,
           "output_dir": str(tmp_path / "out")}
    monkeypatch.setattr(simulation, "fit_client", fit("slow"))
    with caplog.at_level(logging.WARNING, logger="pfedla"):
        slow = run_experiment(config_from_dict(raw), progress=False, track=False).results["pfedla"]
    assert re.search(r"client 2 left out: timed out: \d of 18 batches done when client_timeout=6 s ran out",
                     caplog.text)
    assert [h["failed_clients"] for h in slow.history] == [1.0, 1.0]
    monkeypatch.setattr(simulation, "fit_client", fit("absent"))
    absent = run_experiment(config_from_dict(raw), progress=False, track=False,
                            overwrite=True).results["pfedla"]
    assert slow.client_accuracies == absent.client_accuracies  # tolerance: exact equality


@pytest.mark.parametrize(("algorithm", "step_size"), [("ditto", "ditto.lam=1.0e+30"),
                                                      ("pfedla", "pfedla.hn_lr=1.0e+30")])
def test_a_diverging_run_stops_naming_algorithm_seed_and_round_and_keeps_no_diverged_checkpoint(
        algorithm, step_size, tmp_path, capsys, monkeypatch):
    """Issue 21, case 9: on 42ac5ca every personal model (Ditto) or personalized model (pFedLA) became
    NaN, every accuracy was 0.0000 and the run ended with exit 0."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    code = main(["run", "--quiet", "--set", "clients=3", "--set", "rounds=2", "--set", "model=mlp", "--set",
                 "device=cpu", "--set", f"algorithms=[{algorithm}]", "--set", step_size, "--set",
                 f"output_dir={out}"])
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("pfedla: error:")]
    assert code == 2 and "Traceback" not in stderr and len(errors) == 1, stderr
    assert re.fullmatch(rf"pfedla: error: {algorithm}, seed 0, round [01]: .+ became non-finite "
                        r"\(NaN or Inf\), first at \S+: the run diverged; lower lr .*", errors[0]), errors[0]
    assert not (out / "summary.json").exists() and not (out / "seed_0" / "results").exists()
    for path in (out / "checkpoints").rglob("*.safetensors"):  # what a resume would continue from
        tensors, _ = storage.load_tensors(path)
        assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()), path


@pytest.mark.parametrize("algorithm", ["fedper", "ditto", "fedbn"])
def test_a_resume_never_continues_from_a_non_finite_or_absurd_client_state(algorithm, tiny_config, tmp_path,
                                                                          caplog):
    """Issue 21, case 8: on 42ac5ca a NaN in a client's checkpointed state (FedPer's head, Ditto's
    personal model, FedBN's running variance), or a private layer x 1e30, resumed with exit 0 and that
    client scored 0.0000. Now the newest checkpoint is skipped naming the tensor, and the resume from
    the one before gives the uninterrupted run's numbers."""
    config = tiny_config(algorithms=[algorithm], clients=3, rounds=2, model="mlp_bn")
    finished = run_experiment(config, progress=False, track=False).results[algorithm]
    out = Path(config.output_dir)
    (newest,) = out.glob(f"checkpoints/rounds/*/seed_0/{algorithm}/round_00002.safetensors")
    tensors, meta = storage.load_tensors(newest)
    kept = {"fedper": ".layer.", "ditto": ".personal.", "fedbn": "running_var"}[algorithm]
    name = next(key for key in sorted(tensors) if key.startswith("client.1.") and kept in key)
    with_nan = tensors[name].clone()
    with_nan.view(-1)[0] = float("nan")
    for damaged, problem in [(with_nan, "holds NaN or Inf"),
                             (tensors[name] * 1e30, "holds values beyond 1e+18 in magnitude")]:
        (out / "summary.json").unlink(missing_ok=True)
        (out / "seed_0" / "results" / f"{algorithm}.json").unlink()
        storage.save_tensors(newest, {**tensors, name: damaged}, meta)
        caplog.clear()
        resumed = run_experiment(config, progress=False, track=False, resume=True).results[algorithm]
        assert f"round_00002.safetensors is unusable (tensor '{name}' {problem}" in caplog.text
        assert resumed.client_accuracies == finished.client_accuracies
        assert [without_timing(entry) for entry in resumed.history] == \
            [without_timing(entry) for entry in finished.history]


def without_timing(entry: dict) -> dict:
    return {key: value for key, value in entry.items() if key != "round_seconds"}
