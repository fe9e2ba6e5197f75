"""The compiled Kubeflow pipeline: structure, Kubernetes settings, segments, GPU scheduling.

What a cluster does with these settings cannot run here; the compiled YAML is what the KFP
backend reads, so these tests check it. Real runs under kfp.local are in test_runner.py.
"""

import json
from pathlib import Path

import pytest
import yaml

from pfedla.config import config_from_dict, load_config
from pfedla.errors import ConfigError
from pfedla.images import step_image
from pfedla.ops.deploy import read_env_file
from pfedla.rounds import participants
from pfedla_pipelines.fl_pipeline import (
    STEP_POD_LABELS,
    PipelineError,
    RoundRange,
    compile_pipeline,
    segment_config,
    segments,
)

ROOT = Path(__file__).resolve().parents[2]
SECRET_VALUE = "pfedla-TEST-secret-9f3c1e"
DATA_ROOT = "s3://pfedla"


def compiled(tmp_path, **raw):
    raw.setdefault("pipeline", {}).setdefault("data_root", DATA_ROOT)
    config = config_from_dict(raw)
    path = tmp_path / "pipeline.yaml"
    compile_pipeline(config, path)
    text = path.read_text()
    spec, platform = yaml.safe_load_all(text)
    return config, text, spec, platform["platforms"]["kubernetes"]


def executors_of(platform):
    return platform["deploymentSpec"]["executors"]


def loop_components(spec):
    return [c for name, c in spec["components"].items() if name.startswith("comp-for-loop")]


def round_tasks(spec):
    tasks = spec["root"]["dag"]["tasks"]
    return {name: task for name, task in tasks.items() if name.startswith("fl-round")}


def test_rounds_are_unrolled_with_each_rounds_pods_listed_and_one_server_step(tmp_path):
    config, _, spec, _ = compiled(tmp_path, clients=7, participation=0.6, rounds=3,
                                  pipeline={"parallelism": 3, "clients_per_pod": 2})
    rounds = round_tasks(spec)
    assert len(rounds) == 3
    by_round = {int(t["inputs"]["parameters"]["round_idx"]["runtimeValue"]["constant"]): t
                for t in rounds.values()}
    assert sorted(by_round) == [0, 1, 2]
    for round_idx, task in by_round.items():
        groups = task["inputs"]["parameters"]["groups"]["runtimeValue"]["constant"]
        clients = participants(config, round_idx)
        assert len(clients) == 4 and groups == [f"{clients[0]},{clients[1]}", f"{clients[2]},{clients[3]}"]
        configure_next = task["inputs"]["parameters"]["configure_next"]["runtimeValue"]["constant"]
        assert configure_next is (round_idx < 2)  # the segment's last round plans nothing
    for name, component in spec["components"].items():
        if not name.startswith("comp-fl-round"):
            continue
        tasks = component["dag"]["tasks"]
        assert set(tasks) == {"for-loop-1", "server-round"}  # one server step per round: state read once
        loop = tasks["for-loop-1"]
        assert loop["iteratorPolicy"]["parallelismLimit"] == 3
        assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--groups"
        fan_in = tasks["server-round"]["inputs"]["artifacts"]["updates"]["taskOutputArtifact"]
        assert fan_in["producerTask"] == "for-loop-1"  # dsl.Collected over the loop
    for component in loop_components(spec):
        ((name, task),) = component["dag"]["tasks"].items()
        assert name.startswith("client-train")
        assert set(task["inputs"]["artifacts"]) == {"plan"}  # a manifest: no shards, no other models
    root = spec["root"]["dag"]["tasks"]
    assert root["record"]["inputs"]["artifacts"]["checkpoint"]["taskOutputArtifact"]["producerTask"] == \
        "checkpoint"  # the checkpoint is written by its own step, before MLflow is touched


def test_every_step_requests_resources_and_only_client_steps_retry_and_time_out(tmp_path):
    pipeline = {"cpu_request": "500m", "memory_request": "3Gi", "client_retries": 4,
                "client_pod_timeout": 900}
    _, _, spec, platform = compiled(tmp_path, rounds=2, pipeline=pipeline)
    for name, executor in spec["deploymentSpec"]["executors"].items():
        resources = executor["container"]["resources"]
        assert resources["resourceCpuRequest"] == "500m", name
        assert resources["resourceMemoryRequest"] == "3Gi", name
        deadline = executors_of(platform).get(name, {}).get("activeDeadlineSeconds")
        assert deadline == ("900" if name.startswith("exec-client-train") else None), name
    _, _, _, unlimited = compiled(tmp_path, rounds=1)
    assert not any("activeDeadlineSeconds" in settings for settings in executors_of(unlimited).values())
    for component in loop_components(spec):
        for task in component["dag"]["tasks"].values():
            assert task["retryPolicy"]["maxRetryCount"] == 4
            assert task["retryPolicy"]["backoffFactor"] == 2.0
    others = [t for c in spec["components"].values() if "dag" in c and c not in loop_components(spec)
              for t in c["dag"]["tasks"].values()]
    others += list(spec["root"]["dag"]["tasks"].values())
    assert others and not any("retryPolicy" in t for t in others)


def test_segment_timeout_is_a_run_deadline_that_counts_pending_time(tmp_path):
    """KFP 2.17 turns pipelineConfig.activeDeadlineSeconds into the Argo Workflow's deadline, which
    (unlike a pod's activeDeadlineSeconds) also runs while pods wait to be scheduled."""
    _, _, _, platform = compiled(tmp_path, rounds=2, pipeline={"segment_timeout": 7200})
    assert platform["pipelineConfig"] == {"activeDeadlineSeconds": 7200}
    _, _, _, unbounded = compiled(tmp_path, rounds=2)
    assert "pipelineConfig" not in unbounded


@pytest.mark.parametrize("gpus", [0, 2])
def test_gpu_limits_and_tolerations_exactly_when_requested(tmp_path, gpus):
    pipeline = {"gpus_per_client": gpus, "gpu_node_selector": "nvidia.com/gpu.present=true"}
    _, _, spec, platform = compiled(tmp_path, rounds=2, pipeline=pipeline)
    for name, executor in spec["deploymentSpec"]["executors"].items():
        accelerator = executor["container"]["resources"].get("accelerator")
        settings = executors_of(platform).get(name, {})
        if gpus and name.startswith("exec-client-train"):
            assert accelerator["resourceType"] == "nvidia.com/gpu" and accelerator["resourceCount"] == "2"
            assert settings["tolerations"] == [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            assert settings["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        else:
            assert accelerator is None, name
            assert "tolerations" not in settings and "nodeSelector" not in settings
        assert executor["container"]["image"] == step_image("cuda" if gpus else "cpu")


def test_the_gpu_example_config_agrees_with_the_clusters_gpu_defaults(tmp_path):
    """configs/pipeline-gpu.yaml and ConfigMap pfedla-gpu-defaults (k8s/overlays/gpu) describe the same
    scheduling; the node selector is opt-in on both sides (only GPU feature discovery sets the usual
    label)."""
    defaults = read_env_file(ROOT / "k8s" / "overlays" / "gpu" / "gpu-defaults.env")
    config = load_config(ROOT / "configs" / "pipeline-gpu.yaml")
    pipe = config.pipeline
    assert pipe.gpu_resource == defaults["PFEDLA_GPU_RESOURCE"]
    assert pipe.gpus_per_client == int(defaults["PFEDLA_GPU_COUNT"])
    assert (pipe.gpu_node_selector or "") == defaults["PFEDLA_GPU_NODE_SELECTOR"]
    assert pipe.segment_timeout > 0  # unschedulable GPU pods fail the segment instead of hanging
    compile_pipeline(config, tmp_path / "gpu.yaml")
    _, platform = yaml.safe_load_all((tmp_path / "gpu.yaml").read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    client = next(settings for name, settings in executors.items() if name.startswith("exec-client-train"))
    assert client["tolerations"] == json.loads(defaults["PFEDLA_GPU_TOLERATIONS"])
    assert "nodeSelector" not in client


def test_credentials_are_secret_references_and_never_values(tmp_path, monkeypatch):
    for key in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, SECRET_VALUE)
    _, text, spec, platform = compiled(
        tmp_path, rounds=2, pipeline={"mlflow_secret": "mlflow-auth", "mlflow_tracking_uri": "http://mlflow:5000"})
    assert SECRET_VALUE not in text
    assert "password" not in json.dumps(spec["root"]["inputDefinitions"]).lower()
    for name, settings in executors_of(platform).items():  # every step reaches the data plane
        secrets = {s["secretName"]: {k["envVar"] for k in s["keyToEnv"]} for s in settings["secretAsEnv"]}
        assert secrets["pfedla-s3-credentials"] == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, name
        assert set(secrets) == ({"pfedla-s3-credentials", "mlflow-auth"} if name == "exec-record"
                                else {"pfedla-s3-credentials"}), name
        assert settings["configMapAsEnv"][0]["configMapName"] == "pfedla-endpoints"
    assert spec["root"]["inputDefinitions"]["parameters"]["mlflow_tracking_uri"]["defaultValue"] == \
        "http://mlflow:5000"
    assert spec["root"]["dag"]["tasks"]["record"]["cachingOptions"].get("enableCache") is not True


def test_every_step_pod_carries_the_labels_its_egress_policy_selects(tmp_path):
    """k8s/components/kfp-standalone selects step pods by these labels (test_k8s_manifests checks the
    policy side): a step without them would run outside its egress policy."""
    _, _, spec, platform = compiled(tmp_path, rounds=2)
    executors = executors_of(platform)
    assert set(executors) == set(spec["deploymentSpec"]["executors"])
    for name, settings in executors.items():
        assert settings["podMetadata"]["labels"] == STEP_POD_LABELS, name


def test_long_experiments_are_segments_that_resume_from_their_predecessors_checkpoint(tmp_path):
    config = config_from_dict({"rounds": 50, "pipeline": {"rounds_per_run": 20, "data_root": DATA_ROOT}})
    assert segments(config) == [RoundRange(0, 20, 50), RoundRange(20, 40, 50), RoundRange(40, 50, 50)]
    later = segment_config(config, 40)
    assert later.pipeline.start_round == 40 and later.pipeline.resume_from is None  # its own checkpoint
    _, _, spec, _ = compiled(tmp_path, rounds=50, pipeline={"rounds_per_run": 20, "start_round": 40})
    assert len(round_tasks(spec)) == 10
    explicit = config_from_dict({"rounds": 50, "pipeline": {"rounds_per_run": 20, "start_round": 20,
                                                            "resume_from": "s3://b/other/checkpoints/round_00020",
                                                            "data_root": DATA_ROOT}})
    first, second = (segment_config(explicit, s.first) for s in segments(explicit))
    assert first.pipeline.resume_from == "s3://b/other/checkpoints/round_00020"
    assert second.pipeline.resume_from is None


def test_compiling_needs_a_data_root_and_an_existing_folder(tmp_path):
    with pytest.raises(ConfigError, match="config key 'pipeline.data_root': is not set"):
        compile_pipeline(config_from_dict({"rounds": 1}), tmp_path / "p.yaml")
    with pytest.raises(PipelineError, match="is not a directory"):
        compile_pipeline(config_from_dict({"rounds": 1, "pipeline": {"data_root": DATA_ROOT}}),
                         tmp_path / "missing" / "p.yaml")


def test_a_round_with_more_pods_than_one_launcher_argument_holds_asks_for_bigger_groups(tmp_path):
    raw = {"clients": 450, "rounds": 1, "pipeline": {"data_root": DATA_ROOT}}
    with pytest.raises(PipelineError, match="450 training pods.*pipeline.clients_per_pod to at least 3"):
        compile_pipeline(config_from_dict(raw), tmp_path / "p.yaml")
    raw["pipeline"]["clients_per_pod"] = 3
    compile_pipeline(config_from_dict(raw), tmp_path / "p.yaml")


# The cluster configs; the simulation ones (mnist-comparison.yaml, paper/) are checked in test_config.py.
@pytest.mark.parametrize("shipped", sorted((ROOT / "configs").glob("pipeline-*.yaml")),
                         ids=lambda path: path.name)
def test_shipped_configs_load_and_compile(tmp_path, shipped):
    config = load_config(shipped)
    rounds = compile_pipeline(config, tmp_path / "p.yaml")
    assert rounds.first == 0 and rounds.stop == min(config.rounds, config.pipeline.rounds_per_run)
    assert config.pipeline.data_root.startswith("s3://")  # what a cluster needs
    _, platform = yaml.safe_load_all((tmp_path / "p.yaml").read_text())
    assert platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
