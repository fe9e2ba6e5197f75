"""Running the pipeline without running it: segment-by-segment submission to a fake KFP API, and what
the docker runner refuses before any work."""

import socket

import pytest

from cli_errors import error_line, run_cli
from pfedla.cli import main
from pfedla.errors import PfedlaError
from pfedla.simulation import run_experiment
from pfedla_pipelines.fl_pipeline import ENDPOINT_KEYS, MLFLOW_AUTH_KEYS, S3_KEYS, PipelineError, segments
from pfedla_pipelines.runner import (
    check_container_contract,
    pod_environment,
    run_local,
    run_name,
    step_container_args,
    submit,
)
from planted_links import snapshot

# client_timeout leaves honest clients (18 batches, well under a second alone) room on a loaded
# machine: at 3 s, two honest clients timed out while other test suites shared the 2 cores.


# -- submission to a KFP API --------------------------------------------------------------------------------

# Submitted experiments: three one-round segments, the data plane on S3.
CLUSTER = {"clients": 3, "experiment_name": "submitted",
           "pipeline": {"rounds_per_run": 1, "data_root": "s3://pfedla"}}


def test_submit_runs_every_segment_in_turn_and_a_rerun_continues_after_a_failed_one(tiny_config, kfp_api):
    """The fake KFP API stands in for a cluster: it records runs and moves them through states."""
    config = tiny_config(CLUSTER)
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


def test_submit_refuses_a_segment_argo_could_not_hold_before_any_request(tiny_config, kfp_api):
    config = tiny_config(CLUSTER, clients=200, participation=1.0, rounds=2, pipeline={"rounds_per_run": 2})
    with pytest.raises(PipelineError, match=r"the Workflow of rounds 0..1 \(200 training pods a round\).*"
                                            r"raise pipeline.clients_per_pod"):
        submit(config, kfp_api.url, poll_seconds=0.01, log=lambda line: None)
    assert kfp_api.requests == [] and kfp_api.runs == []


def test_submit_follows_a_segment_that_is_still_running_instead_of_duplicating_it(tiny_config, kfp_api):
    config = tiny_config(CLUSTER)
    kfp_api.script = lambda name: ["PENDING", "RUNNING", "RUNNING", "RUNNING", "SUCCEEDED"]
    submit(config, kfp_api.url, wait=False, log=lambda line: None)
    assert len(kfp_api.runs) == 1
    submit(config, kfp_api.url, poll_seconds=0.01, log=lambda line: None)
    assert [run.display_name for run in kfp_api.runs] == [run_name(config, s) for s in segments(config)]


def test_a_segment_past_its_timeout_is_stopped_and_named(tiny_config, kfp_api):
    """A segment whose pods stay Pending: KFP's run deadline (compiled from segment_timeout) would fail
    it; were it not enforced, ``submit`` terminates the run itself."""
    config = tiny_config(CLUSTER, pipeline={"segment_timeout": 1})
    kfp_api.script = lambda name: ["PENDING"]  # never scheduled
    with pytest.raises(PipelineError, match=r"segment 1/3 \(rounds 0..0\) ran past .*segment_timeout=1 s"):
        submit(config, kfp_api.url, poll_seconds=0.05, log=lambda line: None)
    (run,) = kfp_api.runs
    assert kfp_api.terminated == [run.run_id]
    assert kfp_api.platform(run)["pipelineConfig"]["activeDeadlineSeconds"] == 1
    kfp_api.script = lambda name: ["PENDING"] * 28 + ["FAILED"]  # the backend's deadline fired (~1.4 s)
    with pytest.raises(PipelineError, match=r"ended FAILED .*may have run past pipeline.segment_timeout=1 s"):
        submit(tiny_config(CLUSTER, pipeline={"segment_timeout": 1}), kfp_api.url, poll_seconds=0.05,
               log=lambda line: None)


def test_the_cli_submits_one_segment_without_wait(kfp_api, capsys):
    from pfedla.cli import main

    code = main(["pipeline", "submit", "--host", kfp_api.url, "--no-wait", "--set", "rounds=2",
                 "--set", "pipeline.rounds_per_run=1", "--set", "pipeline.data_root=s3://pfedla"])
    assert code == 0 and len(kfp_api.runs) == 1
    captured = capsys.readouterr()
    assert "segment 1/2 (rounds 0..0): submitted run" in captured.err
    assert "1 more segment(s)" in captured.err and kfp_api.runs[0].run_id in captured.out


@pytest.mark.parametrize("pipeline, message", [
    ({"data_root": None}, "config key 'pipeline.data_root': is not set"),
    ({"data_root": "/home/me/plane"}, "s3:// prefix for a cluster run .pods cannot see /home/me/plane"),
    ({"resume_from": "runs/x/checkpoints/round_00001"}, "pipeline.resume_from must be an s3:// checkpoint"),
])
def test_submit_refuses_locations_a_pod_cannot_reach_before_contacting_anyone(tiny_config, pipeline, message):
    config = tiny_config(CLUSTER, pipeline=pipeline)
    with pytest.raises(PfedlaError, match=message):
        submit(config, "http://127.0.0.1:9")  # nothing is contacted


def test_submit_to_an_unreachable_host_fails_clearly(tiny_config):
    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(PipelineError, match=f"cannot reach the Kubeflow Pipelines API at http://127.0.0.1:{port}"):
        submit(tiny_config(CLUSTER), f"http://127.0.0.1:{port}")


# -- the docker runner's checks (tests/platform/test_containers.py runs the steps in the image) ------------

# A step container sees the network, not this machine's folders: the data plane is on S3.
IN_CONTAINERS = {"clients": 2, "rounds": 1, "pipeline": {"data_root": "s3://pfedla/plane"}}


@pytest.mark.parametrize("pipeline, environ, message", [
    ({"data_root": None}, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"},
     "config key 'pipeline.data_root': is not set"),
    ({"data_root": "/home/me/plane"}, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"},
     "s3:// prefix .* cannot see /home/me/plane"),
    ({}, {}, "the docker runner needs an MLflow tracking server .* not a local sqlite file"),
    ({}, {"MLFLOW_TRACKING_URI": "sqlite:///runs/mlflow.db"}, "not sqlite:///runs/mlflow.db"),
    ({"mlflow_tracking_uri": "file:///tmp/mlruns"}, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"},
     "not file:///tmp/mlruns"),
])
def test_the_docker_runner_refuses_locations_a_container_cannot_reach_before_any_work(
        tiny_config, tmp_path, monkeypatch, pipeline, environ, message):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")  # never reached
    with pytest.raises(PfedlaError, match=message):
        run_local(tiny_config(IN_CONTAINERS, pipeline=pipeline), tmp_path / "root", runner="docker")
    assert not (tmp_path / "out").exists() and not (tmp_path / "root").exists()


def test_the_docker_runner_refuses_a_local_data_dir(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    config = tiny_config(IN_CONTAINERS, dataset="mnist", data_dir=str(tmp_path / "mnist"))
    with pytest.raises(PipelineError, match=f"a step container cannot see {tmp_path / 'mnist'}"):
        check_container_contract(config)


def test_the_docker_runner_says_which_engine_does_not_answer(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/docker.sock")
    with pytest.raises(PipelineError, match=f"no container engine answers at unix://{tmp_path}/docker.sock"):
        run_local(tiny_config(IN_CONTAINERS), tmp_path / "root", runner="docker")
    assert not (tmp_path / "out").exists()


def test_an_unknown_runner_is_refused(tiny_config):
    with pytest.raises(PipelineError, match="unknown runner 'podman': expected one of subprocess, docker"):
        run_local(tiny_config(IN_CONTAINERS), runner="podman")


def test_a_step_container_gets_what_a_pod_gets_and_nothing_else(tiny_config):
    environ = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_ENDPOINT_URL": "http://s3:8333",
               "MLFLOW_S3_ENDPOINT_URL": "http://s3:8333", "AWS_ACCESS_KEY_ID": "id",
               "AWS_SECRET_ACCESS_KEY": "key", "AWS_DEFAULT_REGION": "us-east-1", "HOME": "/root",
               "PATH": "/usr/bin", "MLFLOW_TRACKING_USERNAME": "user", "MLFLOW_TRACKING_PASSWORD": "secret"}
    keys = set(ENDPOINT_KEYS) | set(S3_KEYS)
    assert pod_environment(tiny_config(), environ) == {k: environ[k] for k in keys}
    with_auth = tiny_config(pipeline={"mlflow_secret": "mlflow-auth"})
    assert set(pod_environment(with_auth, environ)) == keys | set(MLFLOW_AUTH_KEYS)
    args = step_container_args({"A": "1"})
    assert args["user"] == "10001:10001" and args["read_only"] is True and args["network_mode"] == "host"
    assert set(args["tmpfs"]) == {"/tmp"} and args["entrypoint"] == [] and args["environment"] == {"A": "1"}
    from kfp import local

    local.DockerRunner(**args)  # kfp accepts every one of them


def test_the_cli_offers_the_docker_runner_and_reports_its_refusal_in_one_line(tmp_path):
    done = run_cli("pipeline", "run-local", "--runner", "docker", "--set", "rounds=1",
                   "--set", f"output_dir={tmp_path / 'out'}", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert "config key 'pipeline.data_root': is not set" in error_line(done.returncode, done.stderr)
    wrong = run_cli("pipeline", "run-local", "--runner", "podman")
    assert wrong.returncode == 2 and "invalid choice: 'podman'" in wrong.stderr
# -- run-local's output directory (checked before kfp.local starts: no step runs in these tests) ----------

def local_run(out, root, *extra):
    return ["pipeline", "run-local", "--set", "clients=3", "--set", "rounds=1", "--set", f"output_dir={out}",
            "--pipeline-root", str(root), *extra]


def test_run_local_leaves_a_finished_pfedla_run_exactly_as_it_was(tiny_config, tmp_path, capsys):
    """Issue 21, case 4: on 42ac5ca run-local took no lock and needed no --overwrite; it replaced the
    finished run's summary.json (3 algorithms x 2 seeds) with its one entry and report then failed."""
    out, root = tmp_path / "out", tmp_path / "root"
    finished = tiny_config(clients=3, rounds=1, seeds=[0, 1], model="mlp",
                           algorithms=["pfedla", "fedavg", "local"])
    run_experiment(finished, progress=False, track=False)
    stored = snapshot(out)
    for extra in ([], ["--overwrite"]):
        line = error_line(main(local_run(out, root, *extra)), capsys.readouterr().err)
        assert line == (f"pfedla: error: {out} holds a run of `pfedla run` (run.json), which "
                        "`pfedla pipeline run-local` never replaces: choose another output_dir")
        assert snapshot(out) == stored
        assert not root.exists()
    assert main(["report", str(out)]) == 0


def test_run_local_replaces_an_earlier_run_locals_outputs_only_when_told(tmp_path, capsys):
    out, root = tmp_path / "out", tmp_path / "root"
    out.mkdir()
    (out / "summary.json").write_text('{"pfedla": {}}')
    line = error_line(main(local_run(out, root)), capsys.readouterr().err)
    assert line == f"pfedla: error: {out} holds a finished run: choose another output_dir, or replace it " \
                   "with --overwrite"
    assert (out / "summary.json").read_text() == '{"pfedla": {}}' and not root.exists()


def test_run_local_into_a_file_is_one_error_line_and_the_file_stays(tmp_path, capsys):
    """Issue 21, case 16: on 42ac5ca output_dir.mkdir raised FileExistsError (a traceback)."""
    taken = tmp_path / "taken"
    taken.write_text("precious\n")
    below = taken / "below"
    for out, problem in [(taken, f"output_dir {taken} exists and is not a directory"),
                         (below, f"output_dir {below} cannot be created: {taken} is not a directory")]:
        line = error_line(main(local_run(out, tmp_path / "root")), capsys.readouterr().err)
        assert line == f"pfedla: error: {problem}"
        assert taken.read_text() == "precious\n"
        assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("where", ["--pipeline-root", "pipeline.data_root"])
def test_run_local_checks_its_locations_before_any_step_runs(tmp_path, capsys, where):
    """Issue 21, case 17: on 42ac5ca a file as the pipeline root or the data plane surfaced from inside
    a step as "Inner task failed: 'partition'" in ANSI colours, the cause somewhere in stdout."""
    taken = tmp_path / "taken"
    taken.write_text("precious\n")
    out, root = tmp_path / "out", tmp_path / "root"
    args = local_run(out, taken if where == "--pipeline-root" else root)
    if where == "pipeline.data_root":
        args += ["--set", f"pipeline.data_root={taken}"]
    code = main(args)
    stderr = capsys.readouterr().err
    assert error_line(code, stderr) == f"pfedla: error: {where} {taken} exists and is not a directory"
    assert "\x1b" not in stderr
    assert taken.read_text() == "precious\n" and not out.exists() and not root.exists()


def test_run_local_finds_an_unreachable_mlflow_before_any_step_runs(tmp_path, capsys, monkeypatch):
    """Issue 21, cases 17 and 18: on 42ac5ca the record step found it after all the training, after
    MLflow's retries (minutes, a urllib3 warning each)."""
    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    out, root = tmp_path / "out", tmp_path / "root"
    line = error_line(main(local_run(out, root)), capsys.readouterr().err)
    assert line.startswith(f"pfedla: error: MLflow at http://127.0.0.1:{port} failed to answer: ")
    assert not out.exists() and not root.exists()
