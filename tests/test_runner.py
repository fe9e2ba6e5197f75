"""Running the pipeline: real kfp.local runs (faulty clients, pods of several clients, chained
segments, the real SeaweedFS and MLflow servers) held to the cluster launcher's rules, and
segment-by-segment submission to a KFP API."""

import builtins
import json
import socket
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import fault_injection
from cli_errors import error_line, run_cli
from launcher_contract import assert_launcher_accepts
from pfedla import simulation
from pfedla.config import config_from_dict, experiment_key
from pfedla.dataplane import run_prefix
from pfedla_pipelines.fl_pipeline import (
    ENDPOINT_KEYS,
    MLFLOW_AUTH_KEYS,
    S3_KEYS,
    PipelineError,
    compile_pipeline,
    segment_config,
    segments,
)
from pfedla_pipelines.runner import (
    check_container_contract,
    pod_environment,
    run_local,
    run_name,
    step_container_args,
    submit,
)

FAULTS = "1:raise,2:slow,3:diverge"  # a lost GPU, a client past client_timeout, a diverging client
# client_timeout leaves honest clients (18 batches, well under a second alone) room on a loaded
# machine: at 3 s, two honest clients timed out while other test suites shared the 2 cores.
FAULTY = {"clients": 6, "rounds": 2, "device": "cpu", "algorithms": ["pfedla"], "client_timeout": 8.0,
          "max_failed_fraction": 0.6}


@pytest.fixture
def restore_print():
    original = builtins.print  # kfp.local patches print while it runs a ParallelFor
    yield
    builtins.print = original


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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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
    again = run_local(config, tmp_path / "root")["pfedla"]
    assert again["client_accuracies"] == summary["client_accuracies"]
    assert again["data_movement"] == summary["data_movement"]


# -- submission to a KFP API --------------------------------------------------------------------------------

def cluster_config(tmp_path, **pipeline):
    return config_from_dict({"clients": 3, "rounds": 3, "experiment_name": "submitted",
                             "pipeline": {"rounds_per_run": 1, "data_root": "s3://pfedla", **pipeline}})


def test_submit_runs_every_segment_in_turn_and_a_rerun_continues_after_a_failed_one(tmp_path, kfp_api):
    """The fake KFP API stands in for a cluster: it records runs and moves them through states."""
    config = cluster_config(tmp_path)
    names = [run_name(config, segment) for segment in segments(config)]
    attempts = {}

    def second_segment_fails_once(name):
        attempts[name] = attempts.get(name, 0) + 1
        if name == names[1] and attempts[name] == 1:
            return ["PENDING", "RUNNING", "FAILED"]
        return ["PENDING", "RUNNING", "SUCCEEDED"]

    kfp_api.script = second_segment_fails_once
    lines = []
    with pytest.raises(PipelineError, match=r"segment 2/3 \(rounds 1..1\) ended FAILED .*the same command"):
        submit(config, kfp_api.url, poll_seconds=0.01, log=lines.append)
    assert [run.display_name for run in kfp_api.runs] == names[:2]
    run_ids = submit(config, kfp_api.url, poll_seconds=0.01, log=lines.append)
    assert [run.display_name for run in kfp_api.runs] == [names[0], names[1], names[1], names[2]]
    assert run_ids == [kfp_api.runs[i].run_id for i in (0, 2, 3)]
    assert any(line.startswith("segment 1/3 (rounds 0..0): already done in run") for line in lines)
    for run, first_round in zip(kfp_api.runs, (0, 1, 1, 2)):
        submitted = kfp_api.submitted_config(run)["pipeline"]
        assert submitted["start_round"] == first_round and submitted["resume_from"] is None
        assert run.body["service_account"] == "pfedla-pipeline-runner"
    for earlier, later in zip(kfp_api.runs, kfp_api.runs[1:]):  # each submitted after the previous ended
        assert later.states_of_others[earlier.display_name] in ("SUCCEEDED", "FAILED")
    assert kfp_api.runs[3].states_of_others[names[1]] == "SUCCEEDED"


def test_submit_follows_a_segment_that_is_still_running_instead_of_duplicating_it(tmp_path, kfp_api):
    config = cluster_config(tmp_path)
    kfp_api.script = lambda name: ["PENDING", "RUNNING", "RUNNING", "RUNNING", "SUCCEEDED"]
    submit(config, kfp_api.url, wait=False, log=lambda line: None)
    assert len(kfp_api.runs) == 1
    submit(config, kfp_api.url, poll_seconds=0.01, log=lambda line: None)
    assert [run.display_name for run in kfp_api.runs] == [run_name(config, s) for s in segments(config)]


def test_a_segment_past_its_timeout_is_stopped_and_named(tmp_path, kfp_api):
    """A segment whose pods stay Pending: KFP's run deadline (compiled from segment_timeout) would fail
    it; were it not enforced, ``submit`` terminates the run itself."""
    config = cluster_config(tmp_path, segment_timeout=1)
    kfp_api.script = lambda name: ["PENDING"]  # never scheduled
    with pytest.raises(PipelineError, match=r"segment 1/3 \(rounds 0..0\) ran past .*segment_timeout=1 s"):
        submit(config, kfp_api.url, poll_seconds=0.05, log=lambda line: None)
    (run,) = kfp_api.runs
    assert kfp_api.terminated == [run.run_id]
    assert kfp_api.platform(run)["pipelineConfig"]["activeDeadlineSeconds"] == 1
    kfp_api.script = lambda name: ["PENDING"] * 28 + ["FAILED"]  # the backend's deadline fired (~1.4 s)
    with pytest.raises(PipelineError, match=r"ended FAILED .*may have run past pipeline.segment_timeout=1 s"):
        submit(cluster_config(tmp_path, segment_timeout=1), kfp_api.url, poll_seconds=0.05,
               log=lambda line: None)


def test_the_cli_submits_one_segment_without_wait(tmp_path, kfp_api, capsys):
    from pfedla.cli import main

    code = main(["pipeline", "submit", "--host", kfp_api.url, "--no-wait", "--set", "rounds=2",
                 "--set", "pipeline.rounds_per_run=1", "--set", "pipeline.data_root=s3://pfedla"])
    assert code == 0 and len(kfp_api.runs) == 1
    captured = capsys.readouterr()
    assert "segment 1/2 (rounds 0..0): submitted run" in captured.err
    assert "1 more segment(s)" in captured.err and kfp_api.runs[0].run_id in captured.out


@pytest.mark.parametrize("pipeline, message", [
    ({"data_root": None}, "pipeline.data_root must be an s3:// prefix"),
    ({"data_root": "/home/me/plane"}, "pods cannot see /home/me/plane"),
    ({"resume_from": "runs/x/checkpoints/round_00001"}, "pipeline.resume_from must be an s3:// checkpoint"),
])
def test_submit_refuses_locations_a_pod_cannot_reach_before_contacting_anyone(tmp_path, pipeline, message):
    config = cluster_config(tmp_path, **pipeline)
    with pytest.raises(PipelineError, match=message):
        submit(config, "http://127.0.0.1:9")  # nothing is contacted


def test_submit_to_an_unreachable_host_fails_clearly(tmp_path):
    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(PipelineError, match=f"cannot reach the Kubeflow Pipelines API at http://127.0.0.1:{port}"):
        submit(cluster_config(tmp_path), f"http://127.0.0.1:{port}")


# -- the docker runner's checks (tests/test_containers.py runs the steps in the image) ----------------------

def container_config(tmp_path, **pipeline):
    return config_from_dict({"clients": 2, "rounds": 1, "output_dir": str(tmp_path / "out"),
                             "pipeline": {"data_root": "s3://pfedla/plane", **pipeline}})


@pytest.mark.parametrize("pipeline, environ, message", [
    ({"data_root": None}, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"},
     "pipeline.data_root must be an s3:// prefix"),
    ({}, {}, "the docker runner needs an MLflow tracking server .* not a local sqlite file"),
    ({}, {"MLFLOW_TRACKING_URI": "sqlite:///runs/mlflow.db"}, "not sqlite:///runs/mlflow.db"),
    ({"mlflow_tracking_uri": "file:///tmp/mlruns"}, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"},
     "not file:///tmp/mlruns"),
])
def test_the_docker_runner_refuses_locations_a_container_cannot_reach_before_any_work(
        tmp_path, monkeypatch, pipeline, environ, message):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")  # never reached
    with pytest.raises(PipelineError, match=message):
        run_local(container_config(tmp_path, **pipeline), tmp_path / "root", runner="docker")
    assert not (tmp_path / "out").exists() and not (tmp_path / "root").exists()


def test_the_docker_runner_refuses_a_local_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    config = config_from_dict({"dataset": "mnist", "data_dir": str(tmp_path / "mnist"), "rounds": 1,
                               "pipeline": {"data_root": "s3://pfedla/plane"}})
    with pytest.raises(PipelineError, match=f"a step container cannot see {tmp_path / 'mnist'}"):
        check_container_contract(config)


def test_the_docker_runner_says_which_engine_does_not_answer(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/docker.sock")
    with pytest.raises(PipelineError, match=f"no container engine answers at unix://{tmp_path}/docker.sock"):
        run_local(container_config(tmp_path), tmp_path / "root", runner="docker")


def test_an_unknown_runner_is_refused(tmp_path):
    with pytest.raises(PipelineError, match="unknown runner 'podman': expected one of subprocess, docker"):
        run_local(container_config(tmp_path), runner="podman")


def test_a_step_container_gets_what_a_pod_gets_and_nothing_else():
    environ = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_ENDPOINT_URL": "http://s3:8333",
               "MLFLOW_S3_ENDPOINT_URL": "http://s3:8333", "AWS_ACCESS_KEY_ID": "id",
               "AWS_SECRET_ACCESS_KEY": "key",
               "AWS_DEFAULT_REGION": "us-east-1", "HOME": "/root", "PATH": "/usr/bin",
               "MLFLOW_TRACKING_USERNAME": "user", "MLFLOW_TRACKING_PASSWORD": "secret"}
    keys = set(ENDPOINT_KEYS) | set(S3_KEYS)
    assert pod_environment(config_from_dict({}), environ) == {k: environ[k] for k in keys}
    with_auth = config_from_dict({"pipeline": {"mlflow_secret": "mlflow-auth"}})
    assert set(pod_environment(with_auth, environ)) == keys | set(MLFLOW_AUTH_KEYS)
    args = step_container_args({"A": "1"})
    assert args["user"] == "10001:10001" and args["read_only"] is True and args["network_mode"] == "host"
    assert set(args["tmpfs"]) == {"/tmp"} and args["entrypoint"] == [] and args["environment"] == {"A": "1"}
    from kfp import local

    local.DockerRunner(**args)  # kfp accepts every one of them


def test_the_cli_offers_the_docker_runner_and_reports_its_refusal_in_one_line(tmp_path):
    code, err = (lambda p: (p.returncode, p.stderr))(run_cli(
        "pipeline", "run-local", "--runner", "docker", "--set", "rounds=1",
        "--set", f"output_dir={tmp_path / 'out'}", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}))
    assert "pipeline.data_root must be an s3:// prefix" in error_line(code, err)
    wrong = run_cli("pipeline", "run-local", "--runner", "podman")
    assert wrong.returncode == 2 and "invalid choice: 'podman'" in wrong.stderr
