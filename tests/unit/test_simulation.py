"""The in-process round loop: output contracts, tracking to the default sqlite store, determinism,
and the default experiment's headline result."""

import json

import pytest

from pfedla.client import EvalResult
from pfedla.config import config_from_dict
from pfedla.results import AlgorithmResult, experiment_summary, format_table
from pfedla.rounds import RunAborted, accuracy_metrics
from pfedla.simulation import run_experiment


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
    outcome = run_experiment(tiny_config(rounds=1, algorithms=["local"]), progress=False)
    assert outcome.tracking_uri == uri and (tmp_path / "elsewhere.db").is_file()
    assert not (tmp_path / "out" / "mlflow.db").exists()


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


