"""Running the pipeline: locally through kfp.local, or on a cluster, segment after segment.

Locally, each step runs either as a subprocess of this Python (``runner="subprocess"``) or in the
step image the way a pod runs it (``runner="docker"``, see ``step_container_args``).

An experiment longer than ``pipeline.rounds_per_run`` runs as a chain of pipeline runs
(segments). Each segment ends with a checkpoint in the data plane, and the next one starts
from it. ``submit`` names each segment's KFP run after the experiment key and its rounds, so
rerunning the same command finds the segments that already succeeded and continues.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from pfedla import registry, rundir, storage
from pfedla.config import ExperimentConfig, experiment_key, single_seed
from pfedla.dataplane import data_root
from pfedla.results import AlgorithmResult, write_layer_weights, write_summary
from pfedla.steps import read_evaluation, round_traffic
from pfedla.tracking import check_reachable, default_tracking_uri
from pfedla_pipelines.fl_pipeline import (
    ENDPOINT_KEYS,
    MLFLOW_AUTH_KEYS,
    S3_KEYS,
    PipelineError,
    RoundRange,
    build_pipeline,
    compile_pipeline,
    default_image,
    pipeline_name,
    segment_config,
    segments,
)
from pfedla_pipelines.kfp_access import KfpApi, connect

# v2beta1 run states; 2.17 reports a terminated run as CANCELING, then FAILED
FINISHED_STATES = {"SUCCEEDED", "SKIPPED", "FAILED", "CANCELED"}
MANIFEST_OUTPUTS = {"shards", "plan", "next_plan", "update", "evaluation", "checkpoint"}
RUNNERS = ("subprocess", "docker")
# The step image's USER: pods run as it, and so do the local step containers.
STEP_UID = 10001
# What kfp.local warns about every step of a run-local, as expected here: resource requests only a
# cluster applies, and the step image that the subprocess runner stands in for.
LOCAL_RUNNER_WARNINGS = (".*have no effect in the current local runner", ".*custom or non-Python base image")
ANSI_CODE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
LOCAL_DATA_PLANE = "data-plane"  # run-local's data plane in output_dir, without pipeline.data_root


# -- local ------------------------------------------------------------------------------------------------

def run_local(config: ExperimentConfig, pipeline_root: str | Path | None = None, runner: str = "subprocess",
              run_args: dict[str, Any] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run every segment of the pipeline here with kfp.local, one after another.

    ``runner="subprocess"`` runs each step as a Python process beside this one; ``runner="docker"``
    runs it in the pipeline's step image as a pod would (``step_container_args``, with the endpoint
    and credential variables of ``pod_environment``); ``run_args`` adds docker run arguments (its
    ``environment`` adds variables). Writes ``summary.json`` (the shape of ``pfedla run``'s, for
    the pipeline's algorithm, plus the bytes each step moved) and, for pFedLA,
    ``layer_weights.npy`` (and with HeurpFedLA ``layer_weights_raw.npy``) into ``config.output_dir``;
    returns the summary. Without ``pipeline.data_root`` the data plane is ``output_dir/data-plane``
    (subprocess runner only). One seed only (``single_seed``). Like ``pfedla run``, it holds the
    directory's lock while it works, refuses a directory holding a run (an earlier run-local's is
    replaced with ``overwrite``, a ``pfedla run``'s never) and a linked folder it would write in,
    all before anything is written.
    """
    config = single_seed(config)
    output_dir = Path(config.output_dir)
    step_runner = _step_runner(config, runner, run_args)  # the config's own checks come first
    preflight(config, pipeline_root)
    existed = output_dir.is_dir()
    with contextlib.ExitStack() as held:
        if existed:  # a concurrent writer must be ruled out before the state is read
            held.enter_context(rundir.RunLock(output_dir))
        rundir.check_pipeline_state(output_dir, overwrite)
        own_plane = config.pipeline.data_root is None
        rundir.check_no_links(output_dir, [rundir.SUMMARY_FILE, *alpha_files()],
                              [LOCAL_DATA_PLANE] if own_plane else [])
        rundir.create(output_dir)
        if not existed:
            held.enter_context(rundir.RunLock(output_dir))
        if overwrite:
            rundir.remove_outputs(output_dir, alpha_files())
        plane = str((output_dir / LOCAL_DATA_PLANE).resolve()) if own_plane else config.pipeline.data_root
        return _run_segments(config, output_dir, pipeline_root, plane, step_runner, runner)


def _step_runner(config: ExperimentConfig, runner: str, run_args: dict[str, Any] | None) -> Any:
    """The kfp.local runner for ``runner``: a subprocess here, or the step image as a pod runs it."""
    from kfp import local

    if runner not in RUNNERS:
        raise PipelineError(f"unknown runner {runner!r}: expected one of {', '.join(RUNNERS)}")
    if runner == "subprocess":
        return local.SubprocessRunner(use_venv=False)
    check_container_contract(config)
    extra = dict(run_args or {})
    environment = {**pod_environment(config), **extra.pop("environment", {})}
    return docker_runner(default_image(config), {**step_container_args(environment), **extra})


def preflight(config: ExperimentConfig, pipeline_root: str | Path | None) -> None:
    """What run-local checks before any step runs, as ``pfedla run`` does: every local location it
    writes can be a directory, and the MLflow store the record step logs to answers (found only
    after all the training otherwise)."""
    rundir.check_writable(Path(config.output_dir))
    if pipeline_root is not None:
        rundir.check_writable(Path(pipeline_root), "--pipeline-root")
    plane = config.pipeline.data_root
    if plane is not None and not storage.is_s3(plane):
        rundir.check_writable(Path(plane), "pipeline.data_root")
    check_reachable(config.pipeline.mlflow_tracking_uri or default_tracking_uri(config.output_dir))


def alpha_files() -> list[str]:
    """Every name ``run_local`` may give α in ``output_dir``, whichever algorithm ran (--overwrite
    removes them all: an earlier algorithm's α would be left beside the new summary)."""
    return [rundir.layer_weights_file(name, raw) for name in registry.algorithm_names()
            for raw in (False, True)]


def _run_segments(config: ExperimentConfig, output_dir: Path, pipeline_root: str | Path | None,
                  plane_root: str, step_runner: Any, runner: str) -> dict[str, Any]:
    from kfp import local

    root = Path(pipeline_root).resolve() if pipeline_root else Path(tempfile.mkdtemp(prefix="pfedla-kfp-"))
    # Locally, ParallelFor threads race on kfp's patched print: run a round's pods one at a time.
    local_config = replace(config, pipeline=replace(config.pipeline, data_root=plane_root, parallelism=1))
    started = time.perf_counter()
    steps: list[dict[str, Any]] = []
    chain = segments(local_config)
    for segment in chain:
        segment_root = root / f"segment-{segment.first:05d}"
        if runner == "docker":
            writable_by_step_user(segment_root)
        original_print = builtins.print  # kfp.local patches print during ParallelFor
        try:
            with warnings.catch_warnings():
                for expected in LOCAL_RUNNER_WARNINGS:
                    warnings.filterwarnings("ignore", message=expected)
                local.init(runner=step_runner, pipeline_root=str(segment_root), raise_on_error=True)
                task = build_pipeline(segment_config(local_config, segment.first))()
        except Exception as error:  # kfp raises plain RuntimeError with the failing task's name
            raise PipelineError(f"local pipeline run failed in rounds {segment.first}..{segment.stop - 1}: "
                                f"{without_colours(str(error))} The step's own error ends its log on stdout; "
                                f"its outputs are in {segment_root}") from error
        finally:
            builtins.print = original_print
        # this run's own folder: a reused pipeline root also holds earlier runs
        run_folder = segment_root / Path(task.output.path).relative_to(segment_root).parts[0]
        steps += step_manifests(run_folder)
    evaluation, weights = read_evaluation(local_config, task.output.path)
    result = AlgorithmResult(
        name=config.pipeline.algorithm, client_accuracies=evaluation["client_accuracies"],
        mean_accuracy=evaluation["mean_accuracy"], rounds=evaluation["rounds"],
        wall_seconds=time.perf_counter() - started,
    )
    rounds = sorted({m["step_round"] for m in steps if m["step"] == "server_round"})
    movement = {"steps": [_ledger(m) for m in steps],
                "rounds": {str(r): round_traffic(steps, r) for r in rounds}}
    orchestration = "kfp.local" if runner == "subprocess" else f"kfp.local ({runner})"
    summary = {result.name: {**result.summary(), "orchestration": orchestration, "data_plane": plane_root,
                             "segments": len(chain), "data_movement": movement}}
    write_summary(output_dir, summary)
    if weights is not None:
        write_layer_weights(output_dir, result.name, weights.alpha, weights.raw)
    return summary


# -- local, in containers ---------------------------------------------------------------------------------

def pod_environment(config: ExperimentConfig, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables a step pod gets from the endpoints ConfigMap and the credential Secrets (the same
    keys ``TaskOptions`` maps), with this process' values."""
    environ = os.environ if environ is None else environ
    keys = ENDPOINT_KEYS + S3_KEYS + (MLFLOW_AUTH_KEYS if config.pipeline.mlflow_secret else ())
    return {key: environ[key] for key in keys if environ.get(key)}


def step_container_args(environment: dict[str, str] | None = None) -> dict[str, Any]:
    """``docker run`` arguments that make a local step container what a cluster runs: the image's
    non-root user, a read-only root filesystem with a writable ``/tmp`` only, and the host network
    (where the local servers listen). The pod's command replaces the image's ``pfedla`` entrypoint;
    kfp.local passes it as the container's arguments, so the entrypoint is cleared."""
    return {"user": f"{STEP_UID}:{STEP_UID}", "read_only": True, "tmpfs": {"/tmp": "rw,exec,nosuid,nodev"},
            "network_mode": "host", "entrypoint": [], "environment": dict(environment or {})}


def check_container_contract(config: ExperimentConfig) -> None:
    """What a step container needs that a subprocess does not: every location reachable from inside it
    (it sees the network and the pipeline root, not this machine's folders)."""
    check_cluster_contract(config)
    tracking = config.pipeline.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not tracking.startswith(("http://", "https://")):
        raise PipelineError(f"the docker runner needs an MLflow tracking server (http://...) in "
                            f"pipeline.mlflow_tracking_uri or MLFLOW_TRACKING_URI, not "
                            f"{tracking or 'a local sqlite file'}: a step container cannot write here")
    if config.data_dir and not storage.is_s3(config.data_dir):
        raise PipelineError(f"data_dir must be an s3:// prefix for the docker runner (a step container "
                            f"cannot see {config.data_dir})")


def docker_runner(image: str, run_args: dict[str, Any]) -> Any:
    """A kfp.local DockerRunner, once the engine (DOCKER_HOST) answers and holds ``image``."""
    import docker
    from kfp import local

    try:
        client = docker.from_env()
    except docker.errors.DockerException as error:
        where = os.environ.get("DOCKER_HOST") or "the default socket"
        raise PipelineError(f"no container engine answers at {where} ({error}): start docker, or "
                            "images/engine.sh start") from None
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise PipelineError(f"the engine has no image {image}: build it with `make image` "
                            "(or set pipeline.image)") from None
    finally:
        client.close()
    return local.DockerRunner(**run_args)


def writable_by_step_user(folder: Path) -> None:
    """Step containers write their outputs under the pipeline root as uid 10001, as a pod writes to its
    volume: hand the folder to that user (as root), or open it to everyone."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(folder, STEP_UID, STEP_UID)
    else:
        folder.chmod(0o777)


def without_colours(text: str) -> str:
    """``text`` without the ANSI colour codes kfp.local puts into its messages."""
    return ANSI_CODE.sub("", text)


def step_manifests(root: Path) -> list[dict[str, Any]]:
    """The manifest with each step's I/O ledger, from a kfp.local pipeline root (one per step)."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.name in MANIFEST_OUTPUTS and path.is_file():
            manifest = storage.read_json(path)
            if "transfers" in manifest:
                found.append(manifest)
    return found


def _ledger(manifest: dict[str, Any]) -> dict[str, Any]:
    return {"step": manifest["step"], "round": manifest.get("step_round"),
            **({"clients": sorted(map(int, manifest["clients"]))}
               if manifest["step"] == "client_train" else {}),
            **manifest["transfers"]}


# -- cluster ----------------------------------------------------------------------------------------------

def run_name(config: ExperimentConfig, segment: RoundRange) -> str:
    """A segment's KFP run name: the experiment key makes reruns find it."""
    return f"{pipeline_name(config)}-{experiment_key(config)}-r{segment.first:05d}-{segment.stop:05d}"


def check_cluster_contract(config: ExperimentConfig) -> None:
    """What a cluster needs that a laptop does not: every location must be reachable from a pod."""
    pipe = config.pipeline
    data_root(config, cluster=True)
    if pipe.resume_from and not storage.is_s3(pipe.resume_from):
        raise PipelineError(f"pipeline.resume_from must be an s3:// checkpoint folder for a cluster run, "
                            f"got {pipe.resume_from}")


def _segment_runs(api: KfpApi, experiment_id: str, key: str) -> dict[str, Any]:
    """This experiment's runs by name (the newest of each), from every page of the listing."""
    match = {"key": "display_name", "operation": "IS_SUBSTRING", "string_value": key}
    query = json.dumps({"predicates": [match]})
    runs, token = [], ""
    while True:
        page = api.call("list runs", lambda t=token: api.client.list_runs(
            experiment_id=experiment_id, page_token=t, page_size=100, filter=query))
        runs += page.runs or []
        token = page.next_page_token
        if not token:
            break
    newest: dict[str, Any] = {}
    for run in sorted(runs, key=lambda r: str(r.created_at)):
        newest[run.display_name] = run
    return newest


def submit(config: ExperimentConfig, host: str, experiment: str | None = None, wait: bool | None = None,
           poll_seconds: float = 15.0, log: Callable[[str], None] | None = None, namespace: str | None = None,
           token_file: str | Path | None = None) -> list[str]:
    """Submit the experiment's segments to a KFP API server; returns the run ids it submitted or found.

    With ``wait`` (the default when there is more than one segment), each segment is followed
    until it ends and the next is submitted after it; without, the first unfinished segment
    is submitted and the call returns. Segments that already succeeded are skipped, so the
    same command continues an interrupted experiment. One seed only (``single_seed``).
    On multi-user Kubeflow, ``namespace`` is the profile the experiment and its runs live in and
    ``token_file`` holds the bearer token (in a pod: ``$KF_PIPELINES_SA_TOKEN_PATH``; see
    ``pfedla_pipelines.kfp_access``).
    """
    config = single_seed(config)
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    check_cluster_contract(config)
    plan = segments(config)
    with tempfile.TemporaryDirectory() as tmp:  # a segment Argo could not hold is refused before any request
        compile_pipeline(segment_config(config, plan[0].first), Path(tmp) / "pipeline.yaml")
    wait = len(plan) > 1 if wait is None else wait
    api = connect(host, namespace, token_file)
    experiment_name = experiment or config.experiment_name
    experiment_id = api.call("create the experiment", lambda: api.client.create_experiment(
        experiment_name, namespace=namespace).experiment_id)
    existing = _segment_runs(api, experiment_id, experiment_key(config))
    run_ids = []
    for number, segment in enumerate(plan, 1):
        label = f"segment {number}/{len(plan)} (rounds {segment.first}..{segment.stop - 1})"
        name = run_name(config, segment)
        run = existing.get(name)
        if run is not None and run.state == "SUCCEEDED":
            say(f"{label}: already done in run {run.run_id}")
            run_ids.append(run.run_id)
            continue
        if run is not None and run.state == "CANCELING":  # terminated earlier: let it stop, then start over
            say(f"{label}: run {run.run_id} is being terminated; waiting for it to stop")
            _follow(api, run.run_id, label, 0, poll_seconds, say)
            run = None
        if run is not None and run.state not in FINISHED_STATES:
            say(f"{label}: run {run.run_id} is still {run.state}; following it")
            run_id = run.run_id
        else:
            run_id = _create_run(api, segment_config(config, segment.first), name, experiment_id)
            say(f"{label}: submitted run {run_id}")
        run_ids.append(run_id)
        if not wait:
            if number < len(plan):
                say(f"{len(plan) - number} more segment(s): run the same command again once it has succeeded "
                    "(or use --wait)")
            return run_ids
        timeout = config.pipeline.segment_timeout
        state, elapsed = _follow(api, run_id, label, timeout, poll_seconds, say)
        if state != "SUCCEEDED":
            hint = (f"; it may have run past pipeline.segment_timeout={timeout} s, e.g. with pods that "
                    f"stayed Pending (check GPU scheduling: kubectl -n {api.step_namespace} get pods)") \
                if timeout and elapsed >= timeout else ""
            raise PipelineError(f"{label} ended {state} (run {run_id}){hint}. Fix the cause, then run the "
                                "same command again: finished segments are skipped")
    return run_ids


def _create_run(api: KfpApi, config: ExperimentConfig, name: str, experiment_id: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "pipeline.yaml"
        compile_pipeline(config, package)
        run = api.call("create the run", lambda: api.client.create_run_from_pipeline_package(
            str(package), arguments={}, experiment_id=experiment_id, run_name=name,
            service_account=config.pipeline.service_account))
    return run.run_id


def _follow(api: KfpApi, run_id: str, label: str, timeout: int, poll_seconds: float,
            say: Callable[[str], None]) -> tuple[str, float]:
    """Poll a run until it ends; returns its final state and how long that took."""
    started, state, reported = time.monotonic(), None, 0.0
    while True:
        run = api.call("report the run", lambda: api.client.get_run(run_id))
        elapsed = time.monotonic() - started
        if run.state != state or elapsed - reported >= 300:  # a line per change, or every 5 minutes
            say(f"{label}: {run.state} after {elapsed:.0f} s")
            state, reported = run.state, elapsed
        if run.state in FINISHED_STATES:
            return run.state, elapsed
        # The backend's own deadline (compiled from segment_timeout) should have ended the run by now;
        # a backend that ignores it gets the run terminated from here, a little later.
        if timeout and elapsed > timeout + max(2 * poll_seconds, min(600.0, timeout)):
            api.call("terminate the run", lambda: api.client.terminate_run(run_id))
            raise PipelineError(f"{label} ran past pipeline.segment_timeout={timeout} s (run {run_id}); "
                                "it was terminated. If its pods stayed Pending, check GPU scheduling "
                                f"(kubectl -n {api.step_namespace} get pods)")
        time.sleep(poll_seconds)
