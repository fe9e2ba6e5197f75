"""Running the pipeline: locally through kfp.local, or on a cluster, segment after segment.

An experiment longer than ``pipeline.rounds_per_run`` runs as a chain of pipeline runs
(segments). Each segment ends with a checkpoint in the data plane, and the next one starts
from it. ``submit`` names each segment's KFP run after the experiment key and its rounds, so
rerunning the same command finds the segments that already succeeded and continues.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
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
from pfedla.errors import without_credentials
from pfedla.results import AlgorithmResult, write_layer_weights, write_summary
from pfedla.steps import read_evaluation, round_traffic
from pfedla.tracking import check_reachable, default_tracking_uri
from pfedla_pipelines.fl_pipeline import (
    PipelineError,
    RoundRange,
    build_pipeline,
    compile_pipeline,
    pipeline_name,
    segment_config,
    segments,
)

# v2beta1 run states; 2.17 reports a terminated run as CANCELING, then FAILED
FINISHED_STATES = {"SUCCEEDED", "SKIPPED", "FAILED", "CANCELED"}
MANIFEST_OUTPUTS = {"shards", "plan", "next_plan", "update", "evaluation", "checkpoint"}
# What kfp.local warns about every step of a run-local, as expected here: resource requests only a
# cluster applies, and the step image that the subprocess runner stands in for.
LOCAL_RUNNER_WARNINGS = (".*have no effect in the current local runner", ".*custom or non-Python base image")
ANSI_CODE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
LOCAL_DATA_PLANE = "data-plane"  # run-local's data plane in output_dir, without pipeline.data_root


# -- local ------------------------------------------------------------------------------------------------

def run_local(config: ExperimentConfig, pipeline_root: str | Path | None = None,
              overwrite: bool = False) -> dict[str, Any]:
    """Run every segment of the pipeline here (kfp.local, one subprocess per step), one after another.

    Writes ``summary.json`` (the shape of ``pfedla run``'s, for the pipeline's algorithm, plus
    the bytes each step moved) and, for pFedLA, ``layer_weights.npy`` (and with HeurpFedLA
    ``layer_weights_raw.npy``) into ``config.output_dir``;
    returns the summary. Without ``pipeline.data_root`` the data plane is ``output_dir/data-plane``.
    One seed only (``single_seed``). Like ``pfedla run``, it holds the directory's lock while it
    works, refuses a directory holding a run (an earlier run-local's is replaced with
    ``overwrite``, a ``pfedla run``'s never) and a linked folder it would write in, all before
    anything is written.
    """
    config = single_seed(config)
    output_dir = Path(config.output_dir)
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
        return _run_segments(config, output_dir, pipeline_root, plane)


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
                  plane_root: str) -> dict[str, Any]:
    from kfp import local

    root = Path(pipeline_root) if pipeline_root else Path(tempfile.mkdtemp(prefix="pfedla-kfp-"))
    # Locally, ParallelFor threads race on kfp's patched print: run a round's pods one at a time.
    local_config = replace(config, pipeline=replace(config.pipeline, data_root=plane_root, parallelism=1))
    started = time.perf_counter()
    steps: list[dict[str, Any]] = []
    chain = segments(local_config)
    for segment in chain:
        segment_root = root / f"segment-{segment.first:05d}"
        original_print = builtins.print  # kfp.local patches print during ParallelFor
        try:
            with warnings.catch_warnings():
                for expected in LOCAL_RUNNER_WARNINGS:
                    warnings.filterwarnings("ignore", message=expected)
                local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(segment_root),
                           raise_on_error=True)
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
    summary = {result.name: {**result.summary(), "orchestration": "kfp.local", "data_plane": plane_root,
                             "segments": len(chain), "data_movement": movement}}
    write_summary(output_dir, summary)
    if weights is not None:
        write_layer_weights(output_dir, result.name, weights.alpha, weights.raw)
    return summary


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


def connect(host: str) -> Any:
    """A ``kfp.Client`` for ``host``; an unreachable API is one error, without the URL's password and
    without kfp's version warning or urllib3's retry lines (the error says what they would)."""
    import kfp

    retries = logging.getLogger("urllib3.connectionpool")
    level = retries.level
    retries.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "only works with Kubeflow Pipeline v2.0.0-b..."
            return kfp.Client(host=host)
    except Exception as error:  # connection refused, DNS, TLS, auth: all surface here
        raise PipelineError(without_credentials(f"cannot reach the Kubeflow Pipelines API at {host}: "
                                                f"{error}")) from None
    finally:
        retries.setLevel(level)


def _api(what: str, host: str, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception as error:
        raise PipelineError(without_credentials(f"the Kubeflow Pipelines API at {host} failed to {what}: "
                                                f"{error}")) from None


def _segment_runs(client: Any, host: str, experiment_id: str, key: str) -> dict[str, Any]:
    """This experiment's runs by name (the newest of each), from every page of the listing."""
    match = {"key": "display_name", "operation": "IS_SUBSTRING", "string_value": key}
    query = json.dumps({"predicates": [match]})
    runs, token = [], ""
    while True:
        page = _api("list runs", host, lambda t=token: client.list_runs(
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
           poll_seconds: float = 15.0, log: Callable[[str], None] | None = None) -> list[str]:
    """Submit the experiment's segments to a KFP API server; returns the run ids it submitted or found.

    With ``wait`` (the default when there is more than one segment), each segment is followed
    until it ends and the next is submitted after it; without, the first unfinished segment
    is submitted and the call returns. Segments that already succeeded are skipped, so the
    same command continues an interrupted experiment. One seed only (``single_seed``).
    """
    config = single_seed(config)
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    check_cluster_contract(config)
    plan = segments(config)
    wait = len(plan) > 1 if wait is None else wait
    client = connect(host)
    experiment_name = experiment or config.experiment_name
    experiment_id = _api("create the experiment", host,
                         lambda: client.create_experiment(experiment_name).experiment_id)
    existing = _segment_runs(client, host, experiment_id, experiment_key(config))
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
            _follow(client, host, run.run_id, label, 0, poll_seconds, say)
            run = None
        if run is not None and run.state not in FINISHED_STATES:
            say(f"{label}: run {run.run_id} is still {run.state}; following it")
            run_id = run.run_id
        else:
            run_id = _create_run(client, host, segment_config(config, segment.first), name, experiment_name)
            say(f"{label}: submitted run {run_id}")
        run_ids.append(run_id)
        if not wait:
            if number < len(plan):
                say(f"{len(plan) - number} more segment(s): run the same command again once it has succeeded "
                    "(or use --wait)")
            return run_ids
        timeout = config.pipeline.segment_timeout
        state, elapsed = _follow(client, host, run_id, label, timeout, poll_seconds, say)
        if state != "SUCCEEDED":
            hint = (f"; it may have run past pipeline.segment_timeout={timeout} s, e.g. with pods that "
                    "stayed Pending (check GPU scheduling: kubectl -n kubeflow get pods)") if timeout and \
                elapsed >= timeout else ""
            raise PipelineError(f"{label} ended {state} (run {run_id}){hint}. Fix the cause, then run the "
                                "same command again: finished segments are skipped")
    return run_ids


def _create_run(client: Any, host: str, config: ExperimentConfig, name: str, experiment: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "pipeline.yaml"
        compile_pipeline(config, package)
        run = _api("create the run", host, lambda: client.create_run_from_pipeline_package(
            str(package), arguments={}, experiment_name=experiment, run_name=name,
            service_account=config.pipeline.service_account))
    return run.run_id


def _follow(client: Any, host: str, run_id: str, label: str, timeout: int, poll_seconds: float,
            say: Callable[[str], None]) -> tuple[str, float]:
    """Poll a run until it ends; returns its final state and how long that took."""
    started, state, reported = time.monotonic(), None, 0.0
    while True:
        run = _api("report the run", host, lambda: client.get_run(run_id))
        elapsed = time.monotonic() - started
        if run.state != state or elapsed - reported >= 300:  # a line per change, or every 5 minutes
            say(f"{label}: {run.state} after {elapsed:.0f} s")
            state, reported = run.state, elapsed
        if run.state in FINISHED_STATES:
            return run.state, elapsed
        # The backend's own deadline (compiled from segment_timeout) should have ended the run by now;
        # a backend that ignores it gets the run terminated from here, a little later.
        if timeout and elapsed > timeout + max(2 * poll_seconds, min(600.0, timeout)):
            _api("terminate the run", host, lambda: client.terminate_run(run_id))
            raise PipelineError(f"{label} ran past pipeline.segment_timeout={timeout} s (run {run_id}); "
                                "it was terminated. If its pods stayed Pending, check GPU scheduling "
                                "(kubectl -n kubeflow get pods)")
        time.sleep(poll_seconds)
