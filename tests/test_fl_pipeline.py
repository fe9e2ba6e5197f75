"""The Kubeflow pipeline: compiled structure, submit errors, and real runs under kfp.local."""

import builtins
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pfedla.config import config_from_dict
from pfedla.images import step_image
from pfedla.simulation import run_experiment
from pfedla_pipelines.fl_pipeline import PipelineError, RoundRange, compile_pipeline, submit

SECRET_VALUE = "pfedla-TEST-secret-9f3c1e"


def compiled(tmp_path, **raw):
    config = config_from_dict(raw)
    path = tmp_path / "pipeline.yaml"
    compile_pipeline(config, path)
    text = path.read_text()
    spec, platform = yaml.safe_load_all(text)
    return config, text, spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def executors(spec, prefix):
    return {k: v for k, v in spec["deploymentSpec"]["executors"].items() if k.startswith(prefix)}


def loop_components(spec):
    return [c for name, c in spec["components"].items() if name.startswith("comp-for-loop")]


def test_rounds_are_unrolled_into_sub_dags_with_parallel_for_and_collected_fan_in(tmp_path):
    _, _, spec, _ = compiled(tmp_path, rounds=4, pipeline={"parallelism": 3})
    root_tasks = spec["root"]["dag"]["tasks"]
    assert sorted(t for t in root_tasks if t.startswith("fl-round")) == [
        "fl-round", "fl-round-2", "fl-round-3", "fl-round-4"]
    rounds = [c for name, c in spec["components"].items() if name.startswith("comp-fl-round")]
    assert len(rounds) == 4
    constants = sorted(root_tasks[t]["inputs"]["parameters"]["round_idx"]["runtimeValue"]["constant"]
                       for t in root_tasks if t.startswith("fl-round"))
    assert constants == [0, 1, 2, 3]
    for component in rounds:
        tasks = component["dag"]["tasks"]
        loop = next(t for name, t in tasks.items() if name.startswith("for-loop"))
        assert loop["iteratorPolicy"]["parallelismLimit"] == 3
        assert "server-configure" in loop["parameterIterator"]["items"]["inputParameter"]
        fan_in = tasks["server-aggregate"]["inputs"]["artifacts"]["updates"]["taskOutputArtifact"]
        assert fan_in["producerTask"].startswith("for-loop")  # dsl.Collected over the loop
    for component in loop_components(spec):
        (name, task), = component["dag"]["tasks"].items()
        assert name.startswith("client-train")


def test_every_step_requests_resources_and_only_client_steps_retry_and_time_out(tmp_path):
    pipeline = {"cpu_request": "500m", "memory_request": "3Gi", "client_retries": 4,
                "client_pod_timeout": 900}
    _, _, spec, platform = compiled(tmp_path, rounds=2, pipeline=pipeline)
    for name, executor in spec["deploymentSpec"]["executors"].items():
        resources = executor["container"]["resources"]
        assert resources["resourceCpuRequest"] == "500m", name
        assert resources["resourceMemoryRequest"] == "3Gi", name
        deadline = platform.get(name, {}).get("activeDeadlineSeconds")
        assert deadline == ("900" if name.startswith("exec-client-train") else None), name
    _, _, _, unlimited = compiled(tmp_path, rounds=1)
    assert not any("activeDeadlineSeconds" in settings for settings in unlimited.values())
    for component in loop_components(spec):
        for task in component["dag"]["tasks"].values():
            assert task["retryPolicy"]["maxRetryCount"] == 4
            assert task["retryPolicy"]["backoffFactor"] == 2.0
    others = [t for c in spec["components"].values() if "dag" in c and c not in loop_components(spec)
              for t in c["dag"]["tasks"].values()]
    others += list(spec["root"]["dag"]["tasks"].values())
    assert others and not any("retryPolicy" in t for t in others)


@pytest.mark.parametrize("gpus", [0, 2])
def test_gpu_limits_and_tolerations_exactly_when_requested(tmp_path, gpus):
    pipeline = {"gpus_per_client": gpus, "gpu_node_selector": "nvidia.com/gpu.present=true"}
    _, _, spec, platform = compiled(tmp_path, rounds=2, pipeline=pipeline)
    for name, executor in spec["deploymentSpec"]["executors"].items():
        accelerator = executor["container"]["resources"].get("accelerator")
        is_client = name.startswith("exec-client-train")
        if gpus and is_client:
            assert accelerator["resourceType"] == "nvidia.com/gpu" and accelerator["resourceCount"] == "2"
            assert platform[name]["tolerations"] == [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            assert platform[name]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        else:
            assert accelerator is None, name
            settings = platform.get(name, {})
            assert "tolerations" not in settings and "nodeSelector" not in settings
        image = executor["container"]["image"]
        assert image == step_image("cuda" if gpus else "cpu")


def test_credentials_are_secret_references_and_never_values(tmp_path, monkeypatch):
    for key in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, SECRET_VALUE)
    config, text, spec, platform = compiled(
        tmp_path, rounds=2,
        pipeline={"mlflow_secret": "mlflow-auth", "mlflow_tracking_uri": "http://mlflow:5000"})
    assert SECRET_VALUE not in text
    assert "password" not in json.dumps(spec["root"]["inputDefinitions"]).lower()
    for name in ("exec-partition", "exec-server-init", "exec-record"):
        secrets = {s["secretName"]: {k["envVar"] for k in s["keyToEnv"]}
                   for s in platform[name]["secretAsEnv"]}
        assert secrets["pfedla-s3-credentials"] == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert platform[name]["configMapAsEnv"][0]["configMapName"] == "pfedla-endpoints"
    record_secrets = {s["secretName"] for s in platform["exec-record"]["secretAsEnv"]}
    assert record_secrets == {"pfedla-s3-credentials", "mlflow-auth"}
    for name in platform:  # client and server steps get no credentials at all
        if name.startswith(("exec-client-train", "exec-server-aggregate", "exec-server-configure")):
            assert "secretAsEnv" not in platform[name]
    assert spec["root"]["inputDefinitions"]["parameters"]["mlflow_tracking_uri"]["defaultValue"] == \
        "http://mlflow:5000"
    record = next(t for t in spec["root"]["dag"]["tasks"].values() if t["taskInfo"]["name"] == "record")
    assert record["cachingOptions"].get("enableCache") is not True


def test_long_runs_are_split_into_chained_pipeline_runs(tmp_path):
    config, _, spec, _ = compiled(tmp_path, rounds=50, pipeline={"rounds_per_run": 20, "start_round": 40,
                                                                 "resume_from": "s3://b/ckpt"})
    assert RoundRange.of(config) == RoundRange(40, 50, 50)
    assert sum(name.startswith("comp-fl-round") for name in spec["components"]) == 10
    config, _, spec, _ = compiled(tmp_path, rounds=50, pipeline={"rounds_per_run": 20})
    assert not RoundRange.of(config).finishes
    assert sum(name.startswith("comp-fl-round") for name in spec["components"]) == 20


def test_submit_to_an_unreachable_host_fails_clearly(tmp_path):
    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(PipelineError, match=f"cannot reach the Kubeflow Pipelines API at http://127.0.0.1:{port}"):
        submit(config_from_dict({"rounds": 1}), f"http://127.0.0.1:{port}")


@pytest.fixture
def restore_print():
    original = builtins.print
    yield
    builtins.print = original


@pytest.mark.integration
def test_run_local_logs_to_mlflow_on_s3_matches_simulation_and_resumes_from_s3(
        tmp_path, mlflow_server, s3_server, monkeypatch, restore_print):
    """Real mlflow server (artifacts on real SeaweedFS S3), real kfp.local runs of every component."""
    from pfedla_pipelines.fl_pipeline import run_local

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.tracking_uri)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    checkpoint = f"s3://{s3_server.bucket}/checkpoints/{tmp_path.name}"
    base = {"clients": 3, "rounds": 3, "device": "cpu", "algorithms": ["pfedla"],
            "experiment_name": f"pipeline-{tmp_path.name}"}
    first = config_from_dict({**base, "output_dir": str(tmp_path / "first"),
                              "pipeline": {"rounds_per_run": 2, "eval_every": 1, "checkpoint_to": checkpoint,
                                           "registered_model": "pfedla-test-model"}})
    summary = run_local(first, tmp_path / "root1")["pfedla"]
    assert summary["rounds"] == 2

    client = MlflowClient(mlflow_server.tracking_uri)
    experiment = client.get_experiment_by_name(base["experiment_name"])
    (run,) = client.search_runs([experiment.experiment_id])
    accuracy = client.get_metric_history(run.info.run_id, "accuracy_mean")
    assert [m.step for m in accuracy] == [0, 1]  # interval evaluation after round 0, final after round 1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "alpha_entropy")] == [0, 1]
    assert accuracy[-1].value == pytest.approx(summary["mean_accuracy"])
    local_alpha = client.download_artifacts(run.info.run_id, "layer_weights/final/layer_weights.npy",
                                            str(tmp_path))
    np.testing.assert_array_equal(np.load(local_alpha), np.load(tmp_path / "first" / "layer_weights.npy"))
    versions = client.search_model_versions("name='pfedla-test-model'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    s3 = s3_server.client()
    # mlflow-artifacts:/<path> is proxied to s3://<bucket>/mlflow/<path>
    prefix = "mlflow/" + run.info.artifact_uri.split(":", 1)[1].strip("/") + "/models/"
    stored = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix)["Contents"]]
    assert stored == [f"{prefix}models.safetensors"]
    ckpt = s3.list_objects_v2(Bucket=s3_server.bucket, Prefix=f"checkpoints/{tmp_path.name}/")["Contents"]
    assert {o["Key"].rsplit("/", 1)[1] for o in ckpt} == {"state.safetensors", "history.json"}

    second = config_from_dict({**base, "output_dir": str(tmp_path / "second"),
                               "pipeline": {"start_round": 2, "resume_from": checkpoint}})
    resumed = run_local(second, tmp_path / "root2")["pfedla"]
    assert resumed["rounds"] == 3

    simulated = run_experiment(config_from_dict({**base, "output_dir": str(tmp_path / "sim")}),
                               progress=False, track=False).results["pfedla"]
    assert resumed["client_accuracies"] == simulated.client_accuracies
    np.testing.assert_array_equal(np.load(tmp_path / "second" / "layer_weights.npy"), simulated.layer_weights)


FAULT_INJECTION = '''
# Loaded by every Python process of the test's kfp.local run (PYTHONPATH): client 1 always fails.
import pfedla.simulation as simulation

_real_fit = simulation.fit_client


def _fit_client(trainer, instruction, shard, config, round_idx, client_id):
    if client_id == 1:
        raise RuntimeError("injected: client 1 lost its GPU")
    return _real_fit(trainer, instruction, shard, config, round_idx, client_id)


simulation.fit_client = _fit_client
'''


@pytest.mark.integration
def test_run_local_goes_on_without_a_client_whose_training_fails(tmp_path, monkeypatch, restore_print):
    """A real kfp.local run in which client 1's step fails every round. The fault is injected
    through a sitecustomize module on PYTHONPATH (each step runs in its own Python process);
    everything else is the real pipeline. It must finish and equal the simulation with the
    same fault."""
    from pfedla import simulation
    from pfedla_pipelines.fl_pipeline import run_local

    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FAULT_INJECTION)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "inject"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = {"clients": 3, "rounds": 1, "device": "cpu", "algorithms": ["pfedla"],
            "experiment_name": f"faulty-{tmp_path.name}"}
    config = config_from_dict({**base, "output_dir": str(tmp_path / "pipe")})
    summary = run_local(config, tmp_path / "root")["pfedla"]

    client = MlflowClient(f"sqlite:///{(tmp_path / 'pipe').resolve()}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name(base["experiment_name"]).experiment_id])
    failed = client.get_metric_history(run.info.run_id, "failed_clients")
    assert [(m.step, m.value) for m in failed] == [(0, 1.0)]

    real_fit = simulation.fit_client

    def fit_client(trainer, instruction, shard, config, round_idx, client_id):
        if client_id == 1:
            raise RuntimeError("injected")
        return real_fit(trainer, instruction, shard, config, round_idx, client_id)

    monkeypatch.setattr(simulation, "fit_client", fit_client)
    simulated = run_experiment(config_from_dict({**base, "output_dir": str(tmp_path / "sim")}),
                               progress=False, track=False).results["pfedla"]
    assert summary["client_accuracies"] == simulated.client_accuracies
    np.testing.assert_array_equal(np.load(tmp_path / "pipe" / "layer_weights.npy"), simulated.layer_weights)


@pytest.mark.parametrize("shipped", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")),
                         ids=lambda path: path.name)
def test_shipped_configs_load_and_compile(tmp_path, shipped):
    from pfedla.config import load_config

    config = load_config(shipped)
    rounds = compile_pipeline(config, tmp_path / "p.yaml")
    assert rounds.first == 0 and rounds.stop == min(config.rounds, config.pipeline.rounds_per_run)
    _, platform = yaml.safe_load_all((tmp_path / "p.yaml").read_text())
    assert platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
