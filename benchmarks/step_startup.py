"""step_startup: what a pipeline step pays before its first line of its own code, in the step image
and as a subprocess, against the work of one client step on the default config.

A one-step pipeline runs a probe component under kfp.local, once with the DockerRunner in the step
image (as a pod runs it: user 10001, read-only root, host network) and once with the
SubprocessRunner. The probe's body notes the time right after ``from pfedla import steps`` (the
import every step's body starts with: torch, numpy, pfedla), after kfp's executor has loaded, i.e.
at the step's first line of its own code. The step's start is its first process's start (the
container's PID 1, or the runner's ``sh``), read from /proc; the launch is the moment kfp.local is
asked to run the task. The client step is ``steps.client_train`` for one client of the default
config (20 clients, digits, the default CNN), called in-process after partition and server_init.

The container part needs an engine and the image (``make image``): the engine is DOCKER_HOST's,
else a docker answering on its default socket, else the project's own (images/engine.sh), started
and stopped here. Without one, the section says why and measures the rest. Tiny mode (the test
suite's, where no engine may be at hand) leaves the container part out and says so;
tests/platform/test_containers.py runs it at tiny size in ``make test-images``.
"""

# No `from __future__ import annotations`: kfp reads the probe's annotations as types.
import builtins
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import Settings, log

ROOT = Path(__file__).resolve().parents[1]
ENGINE_SH = ROOT / "images" / "engine.sh"


def probe() -> str:
    """The probe step: when it started, and when its own code began."""
    import json
    import os
    import time

    from pfedla import steps  # noqa: F401  (what every step's body imports first)

    first_line = time.time()

    def started(pid: int) -> float:  # the process's start on the wall clock, from its age
        with open(f"/proc/{pid}/stat") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as uptime:
            age = float(uptime.read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age

    parent = os.getppid()  # the runner's sh, or 0/1 in a container whose PID 1 is sh or this process
    first_process = parent if parent > 1 else 1
    return json.dumps({"first_line": first_line, "started": started(first_process)})


def run_probe(runner, image: str, root: Path) -> dict:
    """One probe task under ``runner``: launch -> step start -> first own line, in seconds."""
    from kfp import dsl, local

    component = dsl.component(probe, base_image=image, install_kfp_package=False)

    @dsl.pipeline(name="step-startup-probe")
    def pipeline() -> str:
        return component().output

    local.init(runner=runner, pipeline_root=str(root), raise_on_error=True)
    original_print = builtins.print
    launched = time.time()
    try:
        times = json.loads(pipeline().output)
    finally:
        builtins.print = original_print
    return {"launch_to_start_s": times["started"] - launched,
            "start_to_first_line_s": times["first_line"] - times["started"],
            "launch_to_first_line_s": times["first_line"] - launched}


def summarize(samples: list[dict]) -> dict:
    return {key: statistics.median(sample[key] for sample in samples) for key in samples[0]}


def client_step_seconds(repeats: int, clients: int | None = None) -> float:
    """Median seconds of ``steps.client_train`` for one client of the default config (or of the default
    config with ``clients`` clients), in-process."""
    from pfedla import steps
    from pfedla.config import config_from_dict

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = config_from_dict({"device": "cpu", "output_dir": str(root / "out"),
                                   "pipeline": {"data_root": str(root / "plane")},
                                   **({"clients": clients} if clients else {})})
        cfg = steps.config_reference(config)  # what every step but partition gets
        steps.partition(config.to_json(), cfg, root / "shards")
        steps.server_init(cfg, root / "shards", root / "plan")
        times = []
        for client in range(repeats):
            began = time.perf_counter()
            steps.client_train(cfg, str(client), root / "plan", root / f"update_{client}")
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def answers(env: dict[str, str]) -> bool:
    import docker

    try:
        docker.from_env(environment=env).close()
        return True
    except docker.errors.DockerException:
        return False


def container_samples(repeats: int, root: Path) -> tuple[list[dict], str]:
    """Probe runs in the step image; ([], why) when no engine or image is at hand."""
    import docker

    from pfedla.images import step_image
    from pfedla_pipelines.fl_pipeline import PipelineError
    from pfedla_pipelines.runner import docker_runner, step_container_args, writable_by_step_user

    started_engine = False
    if not os.environ.get("DOCKER_HOST") and not answers({}):
        host = subprocess.run(["bash", str(ENGINE_SH), "host"], capture_output=True, text=True).stdout.strip()
        if subprocess.run(["bash", str(ENGINE_SH), "start"], capture_output=True).returncode != 0:
            return [], "no container engine (images/engine.sh start failed: run it as root after install)"
        os.environ["DOCKER_HOST"], started_engine = host, True
    try:
        runner = docker_runner(step_image(), step_container_args({}))
        writable_by_step_user(root)
        return [run_probe(runner, step_image(), root) for _ in range(repeats)], ""
    except (PipelineError, docker.errors.DockerException) as error:
        return [], str(error)
    finally:
        if started_engine:
            subprocess.run(["bash", str(ENGINE_SH), "stop"], check=False)
            del os.environ["DOCKER_HOST"]


def bench(settings: Settings) -> dict:
    """Step start-up in the image and as a subprocess, and one client step's work (default config)."""
    from kfp import local

    from pfedla.images import step_image

    repeats = settings.startup_repeats
    with tempfile.TemporaryDirectory() as tmp:
        if settings.startup_containers:
            log(f"step_startup: {repeats} probe steps in the step image")
            containers, missing = container_samples(repeats, Path(tmp) / "docker")
        else:
            containers, missing = [], (f"{settings.mode} mode runs no containers; make test-images runs "
                                       "this part at tiny size")
        if missing:
            log(f"step_startup: the step image part is skipped: {missing}")
        log(f"step_startup: {repeats} probe steps as subprocesses")
        here = local.SubprocessRunner(use_venv=False)
        subprocesses = [run_probe(here, step_image(), Path(tmp) / "subprocess") for _ in range(repeats)]
    log(f"step_startup: {repeats} client steps of the default config, in-process")
    client_s = client_step_seconds(repeats, settings.startup_clients)
    docker = summarize(containers) if containers else None
    clients = settings.startup_clients
    config = "the default config" + (f" with {clients} clients" if clients else "")
    return {"repeats": repeats, "docker": docker, "docker_missing": missing,
            "subprocess": summarize(subprocesses), "client_config": config, "client_step_s": client_s,
            "startup_per_client_step": docker["launch_to_first_line_s"] / client_s if docker else None}


def table(result: dict) -> list[str]:
    """The section's lines of the printed table, ending with a blank separator line."""
    lines = [f"step start-up, launch -> first own line (interpreter, kfp, torch, pfedla imports), "
             f"median of {result['repeats']}:"]
    for name, label in (("docker", "in the step image, as a pod"), ("subprocess", "as a subprocess")):
        t = result[name]
        lines.append(f"  {label:<28}: " + (
            f"{t['launch_to_first_line_s']:.2f} s (launch -> process start {t['launch_to_start_s']:.2f} s, "
            f"start -> first own line {t['start_to_first_line_s']:.2f} s)" if t
            else f"not measured ({result['docker_missing']})"))
    lines.append(f"  one client step's work on {result['client_config']}: {result['client_step_s']:.2f} s"
                 + (f"; a pod's start-up is {result['startup_per_client_step']:.0f}x that"
                    if result["docker"] else ""))
    return [*lines, ""]
