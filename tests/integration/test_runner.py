"""Running the pipeline: real kfp.local runs (faulty clients, pods of several clients, chained
segments, the real SeaweedFS and MLflow servers) held to the cluster launcher's rules, and
segment-by-segment submission to a KFP API."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import fault_injection
from cli_errors import error_line, run_cli
from launcher_contract import assert_launcher_accepts
from pfedla import simulation
from pfedla.cli import main
from pfedla.config import config_from_dict, experiment_key
from pfedla.dataplane import run_prefix
from pfedla_pipelines.fl_pipeline import compile_pipeline, segment_config, segments
from pfedla_pipelines.runner import run_local
from planted_links import plant_file_link, snapshot

FAULTS = "1:raise,2:slow,3:diverge"  # a lost GPU, a client past client_timeout, a diverging client


FAULTY = {"clients": 6, "rounds": 2, "device": "cpu", "algorithms": ["pfedla"], "client_timeout": 8.0,
          "max_failed_fraction": 0.6}


def simulate(raw, faults, monkeypatch, tmp_path):
    """``pfedla run``'s numbers for the same config, with the same faults injected in-process."""
    monkeypatch.setattr(simulation, "fit_client", simulation.fit_client)  # restored after the test
    fault_injection.install(faults)
    config = config_from_dict({**raw, "output_dir": str(tmp_path / "simulated"), "pipeline": {}})
    return simulation.run_experiment(config, progress=False, track=False).results["pfedla"]


def run_pipeline(raw, faults, monkeypatch, tmp_path):
    """A real kfp.local run with ``faults`` injected into every step process; every executor output
    of every segment is held to the KFP 2.17 launcher's rules."""
    monkeypatch.setenv("PYTHONPATH", str(fault_injection.sitecustomize_dir(tmp_path / "inject")))
    monkeypatch.setenv(fault_injection.ENV, faults)
    config = config_from_dict({**raw, "output_dir": str(tmp_path / "pipe")})
    summary = run_local(config, tmp_path / "root")["pfedla"]
    data_root = summary["data_plane"]
    with_root = config_from_dict({**raw, "pipeline": {**raw.get("pipeline", {}), "data_root": data_root}})
    for segment in segments(with_root):
        compiled = tmp_path / f"segment-{segment.first}.yaml"
        compile_pipeline(segment_config(with_root, segment.first), compiled)
        assert assert_launcher_accepts(tmp_path / "root" / f"segment-{segment.first:05d}", compiled) >= 7
    return config, summary


def assert_equal_to_simulation(summary, tmp_path, simulated):
    assert summary["client_accuracies"] == simulated.client_accuracies  # exactly, on CPU
    assert summary["mean_accuracy"] == simulated.mean_accuracy
    assert summary["client_mean_accuracy"] == simulated.client_mean_accuracy
    np.testing.assert_array_equal(np.load(tmp_path / "pipe" / "layer_weights.npy"), simulated.layer_weights)
    assert (tmp_path / "pipe" / "layer_weights_raw.npy").exists() == (simulated.raw_layer_weights is not None)


def client_steps(summary):
    return [step for step in summary["data_movement"]["steps"] if step["step"] == "client_train"]


def assert_each_client_step_moves_only_its_own_objects(summary, size_of):
    """Every client step read exactly its clients' start models and train splits; where the objects
    still exist (``size_of`` gives None once a round is deleted), its bytes are theirs + its plan."""
    for step in client_steps(summary):
        own = set()
        for client in step["clients"]:
            own |= {f"rounds/{step['round']:05d}/models/client_{client}.safetensors",
                    f"data/client_{client}.train.safetensors"}
        assert set(step["objects_read"]) == own, step
        assert set(step["objects_written"]) <= {f"rounds/{step['round']:05d}/updates/client_{c}.safetensors"
                                                for c in step["clients"]}
        sizes = [size_of(key) for key in step["objects_read"]]
        if None not in sizes:
            assert 0 < step["read_bytes"] - sum(sizes) < 16 * 1024, step  # besides them, only its plan


def test_faulty_clients_one_per_pod_match_the_simulation_and_move_only_their_own_bytes(
        tmp_path, monkeypatch, restore_print):
    """Raising, timing-out and diverging clients: the rounds go on without them, the results equal
    ``pfedla run`` with the same faults, each client step reads only its own start model and train
    split, and a round moves at most 1.2x the least bytes possible."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = {**FAULTY, "experiment_name": f"faulty-{tmp_path.name}", "pipeline": {"eval_every": 1}}
    config, summary = run_pipeline(raw, FAULTS, monkeypatch, tmp_path)
    simulated = simulate(raw, FAULTS, monkeypatch, tmp_path)
    assert_equal_to_simulation(summary, tmp_path, simulated)
    assert [h["failed_clients"] for h in simulated.history] == [3.0, 3.0]
    tracked = MlflowClient(f"sqlite:///{tmp_path / 'pipe' / 'mlflow.db'}")
    (run,) = tracked.search_runs([tracked.get_experiment_by_name(raw["experiment_name"]).experiment_id])
    for metric in ("accuracy_mean", "accuracy_client_mean"):  # evaluated inside the run too
        accuracy = tracked.get_metric_history(run.info.run_id, metric)
        expected = [(r, h[metric]) for r, h in enumerate(simulated.history)]
        assert [(m.step, m.value) for m in accuracy] == expected, metric
    assert [m.value for m in tracked.get_metric_history(run.info.run_id, "failed_clients")] == [3.0, 3.0]

    prefix = Path(summary["data_plane"]) / "runs" / raw["experiment_name"] / experiment_key(config)
    def size_of(key):
        return (prefix / key).stat().st_size if (prefix / key).is_file() else None

    assert_each_client_step_moves_only_its_own_objects(summary, size_of)
    steps = client_steps(summary)
    assert len(steps) == 12 and all(len(step["clients"]) == 1 for step in steps)
    failed = {(s["round"], s["clients"][0]) for s in steps if not s["objects_written"]}
    assert {(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)} <= failed  # reported, nothing uploaded
    for round_idx, traffic in summary["data_movement"]["rounds"].items():
        assert traffic["clients"] == 6 and traffic["ratio"] <= 1.2, (round_idx, traffic)
    # keep_rounds=1: after round 1, round 0's objects are gone; the checkpoint stays
    assert sorted(p.name for p in (prefix / "rounds").iterdir()) == ["00001", "00002"]
    assert (prefix / "checkpoints" / "round_00002" / "state.safetensors").is_file()


def test_chained_segments_with_three_clients_per_pod_on_s3_match_the_simulation_and_share_one_mlflow_run(
        tmp_path, monkeypatch, restore_print, s3_server, mlflow_server):
    """Real SeaweedFS as the data plane and a real mlflow server; two segments of one round each,
    each pod training three clients in turn, with the same faulty clients."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.tracking_uri)
    data_root = f"s3://{s3_server.bucket}/plane-{tmp_path.name}"
    raw = {**FAULTY, "experiment_name": f"chained-{tmp_path.name}",
           "pipeline": {"rounds_per_run": 1, "clients_per_pod": 3, "data_root": data_root,
                        "registered_model": f"chained-{tmp_path.name}"}}
    config, summary = run_pipeline(raw, FAULTS, monkeypatch, tmp_path)
    assert summary["segments"] == 2 and summary["rounds"] == 2
    assert_equal_to_simulation(summary, tmp_path, simulate(raw, FAULTS, monkeypatch, tmp_path))

    s3 = s3_server.client()
    key_prefix = run_prefix(config, data_root).split("/", 3)[3]
    sizes = {o["Key"][len(key_prefix) + 1:]: o["Size"]
             for o in s3.list_objects_v2(Bucket=s3_server.bucket, Prefix=key_prefix + "/")["Contents"]}
    steps = client_steps(summary)
    assert sorted(step["clients"] for step in steps) == [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]
    assert_each_client_step_moves_only_its_own_objects(summary, sizes.get)
    assert all(t["ratio"] <= 1.2 for t in summary["data_movement"]["rounds"].values())
    assert {"checkpoints/round_00001/manifest.json", "checkpoints/round_00002/state.safetensors",
            "checkpoints/LATEST"} <= set(sizes)
    pointer = s3.get_object(Bucket=s3_server.bucket, Key=f"{key_prefix}/checkpoints/LATEST")
    latest = json.loads(pointer["Body"].read())
    assert latest["round"] == 2
    assert latest["manifest"]["uri"].endswith("checkpoints/round_00002/manifest.json")

    client = MlflowClient(mlflow_server.tracking_uri)
    experiment = client.get_experiment_by_name(raw["experiment_name"])
    (run,) = client.search_runs([experiment.experiment_id])  # one run across both segments
    assert run.info.status == "FINISHED" and run.data.tags["pfedla.experiment_key"] == experiment_key(config)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "clients")] == [0, 1]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "accuracy_mean")] == [0, 1]
    assert client.get_metric_history(run.info.run_id, "final_accuracy_mean")[0].value == \
        pytest.approx(summary["mean_accuracy"])
    assert client.get_metric_history(run.info.run_id, "final_accuracy_client_mean")[0].value == \
        pytest.approx(summary["client_mean_accuracy"])
    versions = client.search_model_versions(f"name='{raw['pipeline']['registered_model']}'")
    assert [v.run_id for v in versions] == [run.info.run_id]  # one version, when the experiment finished


def test_a_baseline_with_client_state_runs_end_to_end_across_segments_and_matches_the_simulation(
        tmp_path, monkeypatch, restore_print):
    """fedbn on cnn_bn in two kfp.local segments: each client's BatchNorm layers and running statistics
    live in objects only its own client steps read and write, and cross the segment boundary through
    the checkpoint."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = {"clients": 4, "rounds": 2, "device": "cpu", "model": "cnn_bn", "participation": 0.75,
           "algorithms": ["fedbn"], "experiment_name": f"fedbn-{tmp_path.name}",
           "pipeline": {"algorithm": "fedbn", "rounds_per_run": 1}}
    config = config_from_dict({**raw, "output_dir": str(tmp_path / "pipe")})
    summary = run_local(config, tmp_path / "root")["fedbn"]
    simulated = simulation.run_experiment(config_from_dict({**raw, "output_dir": str(tmp_path / "sim")}),
                                          progress=False, track=False).results["fedbn"]
    assert summary["segments"] == 2
    assert summary["client_accuracies"] == simulated.client_accuracies  # exactly, on CPU
    with_root = config_from_dict({**raw, "pipeline": {**raw["pipeline"], "data_root": summary["data_plane"]}})
    for segment in segments(with_root):
        compiled = tmp_path / f"segment-{segment.first}.yaml"
        compile_pipeline(segment_config(with_root, segment.first), compiled)
        assert assert_launcher_accepts(tmp_path / "root" / f"segment-{segment.first:05d}", compiled) >= 7
    trained_before = set()
    for step in sorted(client_steps(summary), key=lambda s: s["round"]):
        (client,) = step["clients"]
        own_state = {key for key in step["objects_read"] if "clients/" in key}
        # round 1 is the second segment: it starts from the checkpoint's copies of the client states
        assert own_state == ({f"checkpoints/round_00001/clients/client_{client}.safetensors"}
                             if client in trained_before else set()), step
        written = f"clients/client_{client}/round_{step['round']:05d}/state.safetensors"
        assert written in step["objects_written"]
        trained_before.add(client)
    assert all(t["ratio"] <= 1.2 for t in summary["data_movement"]["rounds"].values())


def test_a_round_in_which_every_client_fails_goes_on_with_launcher_safe_outputs(
        tmp_path, monkeypatch, restore_print):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = {"clients": 3, "rounds": 2, "device": "cpu", "algorithms": ["pfedla"], "max_failed_fraction": 1.0,
           "experiment_name": f"all-fail-{tmp_path.name}"}
    _, summary = run_pipeline(raw, "*:raise@0", monkeypatch, tmp_path)
    simulated = simulate(raw, "*:raise@0", monkeypatch, tmp_path)
    assert_equal_to_simulation(summary, tmp_path, simulated)
    assert summary["rounds"] == 2
    assert simulated.history[0]["failed_clients"] == 3.0 and "train_loss" not in simulated.history[0]
    assert "train_loss" in simulated.history[1]
    # again into the same pipeline root: the summary counts this run's steps only, and nothing changed
    config = config_from_dict({**raw, "output_dir": str(tmp_path / "pipe")})
    again = run_local(config, tmp_path / "root", overwrite=True)["pfedla"]
    assert again["client_accuracies"] == summary["client_accuracies"]
    assert again["data_movement"] == summary["data_movement"]


# -- run-local's output directory and errors -----------------------------------------------------------------

LOCAL = ["--set", "clients=3", "--set", "rounds=1", "--set", "model=mlp", "--set", "device=cpu"]


def test_run_local_replaces_links_at_its_names_and_writes_nothing_outside(tmp_path, monkeypatch, capsys,
                                                                          restore_print):
    """Issue 21's confinement for run-local: links planted at summary.json, the α files and their
    temporary names are replaced, never written through; MLflow's artifacts stay in output_dir (on
    42ac5ca they went to ./mlruns of the working directory, and summary.json was written through a
    link)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out, outside, cwd = tmp_path / "out", tmp_path / "outside", tmp_path / "cwd"
    out.mkdir()
    cwd.mkdir()
    names = ["summary.json", "layer_weights.npy", "layer_weights_raw.npy"]
    for index, name in enumerate(names):
        plant_file_link(out, outside, name, index)
    before = snapshot(outside)
    monkeypatch.chdir(cwd)
    args = ["pipeline", "run-local", *LOCAL, "--set", f"output_dir={out}", "--pipeline-root",
            str(tmp_path / "root")]
    line = error_line(main(args), capsys.readouterr().err)  # the planted summary.json looks like a run
    assert line.endswith("holds a finished run: choose another output_dir, or replace it with --overwrite")
    assert main([*args, "--overwrite"]) == 0, capsys.readouterr().err
    assert snapshot(outside) == before
    assert list(cwd.iterdir()) == []
    for name in ("summary.json", "layer_weights.npy"):  # pfedla without HeurpFedLA: no raw α
        assert (out / name).is_file() and not (out / name).is_symlink(), name
    assert not os.path.lexists(out / "layer_weights_raw.npy")
    assert json.loads((out / "summary.json").read_text())["pfedla"]["rounds"] == 1
    assert any((out / "mlartifacts").rglob("evaluation.json"))


def test_a_failing_step_is_one_error_line_without_colour_codes(tmp_path):
    """Issue 21, case 17: on 42ac5ca it ended with "Inner task failed" in ANSI colour codes after
    kfp.local's warnings about every step."""
    args = ["pipeline", "run-local", "--set", "clients=3", "--set", "rounds=2", "--set", "model=mlp",
            "--set", "device=cpu", "--set", "pipeline.start_round=1", "--set",
            f"pipeline.resume_from={tmp_path / 'nowhere'}", "--set", f"output_dir={tmp_path / 'out'}",
            "--pipeline-root", str(tmp_path / "root")]
    result = run_cli(*args, env={"MLFLOW_TRACKING_URI": ""})
    line = error_line(result.returncode, result.stderr)
    assert "\x1b" not in result.stderr
    assert line.startswith("pfedla: error: local pipeline run failed in rounds 1..1: ")
    assert "Inner task failed: 'server-init'." in line and "ends its log on stdout" in line
    assert f"cannot read {tmp_path / 'nowhere'}/manifest.json" in result.stdout
