"""The pFedLA Kubeflow pipeline: partition -> plan -> R unrolled rounds -> evaluate -> checkpoint -> record.

KFP v2 has no runtime loop, so rounds are unrolled at compile time: each round is one
``fl-round`` sub-pipeline (ParallelFor over the round's training pods, then the server step,
ordered after the whole loop, which reads every pod's report at its fixed data-plane key,
aggregates and plans the next round, so the server state is read once per round). No artifact
list passes from the loop to the server step: a pod's arguments do not grow with the round's
pods. The round's clients are a seeded draw known at compile time, so each round's pods are
listed in the YAML. Only ``partition`` gets the config inline; every other step gets a reference
to the object it writes (``steps.config_reference``). One pipeline run (a *segment*) covers at
most ``pipeline.rounds_per_run`` rounds; longer experiments chain segments through the
checkpoints the ``checkpoint`` step writes to the data plane (``pfedla_pipelines.runner`` runs them).
Compiling estimates what the run puts on the cluster (``pfedla.workflow_size``) and refuses a
segment that Argo could not hold.
"""


import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from kfp import compiler, dsl, kubernetes

from pfedla import storage
from pfedla.cluster import CLIENT_RETRY_BACKOFF_FACTOR, CLIENT_RETRY_BACKOFF_SECONDS, client_retry_window
from pfedla.config import ExperimentConfig, single_seed
from pfedla.dataplane import data_root
from pfedla.errors import PfedlaError
from pfedla.images import step_image
from pfedla.steps import config_reference, round_pods
from pfedla.workflow_size import Estimate, estimate, pod_problem, rounds_that_fit, workflow_problem
from pfedla_components import Components, build_components

S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
ENDPOINT_KEYS = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
MLFLOW_AUTH_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# Labels of every step's pod: the egress NetworkPolicy of k8s/components/kfp-standalone selects them.
STEP_POD_LABELS = {"app.kubernetes.io/part-of": "pfedla", "app.kubernetes.io/component": "pipeline-step"}


class PipelineError(PfedlaError):
    """The pipeline could not be compiled, run or submitted."""


@dataclass(frozen=True)
class RoundRange:
    """The rounds one pipeline run (segment) covers: [first, stop) of ``total``."""

    first: int
    stop: int
    total: int

    @classmethod
    def of(cls, config: ExperimentConfig) -> "RoundRange":
        first = config.pipeline.start_round
        return cls(first, min(config.rounds, first + config.pipeline.rounds_per_run), config.rounds)

    @property
    def finishes(self) -> bool:
        return self.stop == self.total


def segments(config: ExperimentConfig) -> list[RoundRange]:
    """Every segment from ``pipeline.start_round`` to the last round, ``rounds_per_run`` each."""
    ranges = [RoundRange.of(config)]
    while not ranges[-1].finishes:
        ranges.append(RoundRange.of(segment_config(config, ranges[-1].stop)))
    return ranges


def segment_config(config: ExperimentConfig, first_round: int) -> ExperimentConfig:
    """``config`` for the segment starting at ``first_round`` (later segments resume its checkpoint)."""
    resume_from = config.pipeline.resume_from if first_round == config.pipeline.start_round else None
    pipeline = replace(config.pipeline, start_round=first_round, resume_from=resume_from)
    return replace(config, pipeline=pipeline)


class TaskOptions:
    """Every per-task Kubernetes setting, applied in one place."""

    def __init__(self, config: ExperimentConfig):
        self.pipe = config.pipeline

    def step(self, task: Any, cacheable: bool = True) -> Any:
        """Every step: requests, caching, pod labels, and the data plane's endpoint and credentials."""
        task.set_cpu_request(self.pipe.cpu_request).set_memory_request(self.pipe.memory_request)
        for key, value in STEP_POD_LABELS.items():
            kubernetes.add_pod_label(task, key, value)
        task.set_caching_options(self.pipe.caching and cacheable)
        kubernetes.use_config_map_as_env(task, self.pipe.endpoints_config_map,
                                         {key: key for key in ENDPOINT_KEYS})
        kubernetes.use_secret_as_env(task, self.pipe.s3_secret, {key: key for key in S3_KEYS})
        return task

    def client(self, task: Any) -> Any:
        """Client training: GPU when asked for; its pod retried ``client_retries`` times when it fails
        (exits non-zero, is OOM-killed or evicted, overruns ``client_pod_timeout``) or errors (deleted
        with its node, a failed init or wait container). Failed pods are retried only on a cluster
        with pfedla's Argo retry defaults (k8s/components/kfp-standalone/workflow-controller-retries.yaml);
        under KFP's own defaults only errors are. The retry window covers every attempt."""
        self.step(task)
        if self.pipe.client_retries:
            window = client_retry_window(self.pipe.client_retries, self.pipe.client_pod_timeout,
                                         self.pipe.segment_timeout)
            task.set_retry(num_retries=self.pipe.client_retries,
                           backoff_duration=f"{CLIENT_RETRY_BACKOFF_SECONDS}s",
                           backoff_factor=float(CLIENT_RETRY_BACKOFF_FACTOR),
                           backoff_max_duration=f"{window}s")
        if self.pipe.client_pod_timeout:  # backstop for a hang that client_timeout cannot interrupt
            kubernetes.set_timeout(task, self.pipe.client_pod_timeout)
        if self.pipe.gpus_per_client:
            task.set_accelerator_type(self.pipe.gpu_resource)
            task.set_accelerator_limit(self.pipe.gpus_per_client)
            kubernetes.add_toleration(task, key=self.pipe.gpu_resource, operator="Exists",
                                      effect="NoSchedule")
            if self.pipe.gpu_node_selector:
                label, _, value = self.pipe.gpu_node_selector.partition("=")
                kubernetes.add_node_selector(task, label_key=label, label_value=value)
        return task

    def record(self, task: Any) -> Any:
        """The MLflow step: never cached (it appends to the experiment's run), optional MLflow auth."""
        self.step(task, cacheable=False)
        if self.pipe.mlflow_secret:
            kubernetes.use_secret_as_env(task, self.pipe.mlflow_secret, {k: k for k in MLFLOW_AUTH_KEYS})
        return task


def default_image(config: ExperimentConfig) -> str:
    return config.pipeline.image or step_image("cuda" if config.pipeline.gpus_per_client else "cpu")


def pipeline_name(config: ExperimentConfig) -> str:
    return f"pfedla-{config.pipeline.algorithm.replace('_', '-')}"


def build_pipeline(config: ExperimentConfig) -> Callable:
    """The pipeline function for ``config``'s segment (its rounds unrolled)."""
    parts: Components = build_components(default_image(config))
    options = TaskOptions(config)
    rounds = RoundRange.of(config)
    eval_every = config.pipeline.eval_every
    config_json, config_ref = config.to_json(), config_reference(config)
    deadline = config.pipeline.segment_timeout or None  # the whole run, Pending pods included

    @dsl.pipeline(name="fl-round", description="One round: train its clients, aggregate, plan the next.")
    def fl_round(config_ref: str, round_idx: int, configure_next: bool, groups: list[str],
                 shards: dsl.Input[dsl.Dataset], plan: dsl.Input[dsl.Artifact]) -> dsl.Artifact:
        with dsl.ParallelFor(groups, parallelism=config.pipeline.parallelism) as group:
            train = options.client(parts.client_train(config_ref=config_ref, clients=group, plan=plan))
        # after the whole loop (KFP 2.17 compiles this to `depends: for-loop-N.Succeeded`); the reports
        # are read at their data-plane keys, so nothing here grows with the round's pods
        server = options.step(parts.server_round(
            config_ref=config_ref, round_idx=round_idx, configure_next=configure_next, shards=shards,
            plan=plan)).after(train)
        return server.outputs["next_plan"]

    @dsl.pipeline(
        name=pipeline_name(config),
        description=f"{config.pipeline.algorithm} rounds {rounds.first}..{rounds.stop - 1} of {rounds.total}",
        pipeline_config=dsl.PipelineConfig(active_deadline_seconds=deadline),
    )
    def pipeline(config_json: str = config_json, config_ref: str = config_ref,
                 mlflow_tracking_uri: str = config.pipeline.mlflow_tracking_uri or "") -> dsl.Artifact:
        shards = options.step(parts.partition(config_json=config_json,
                                              config_ref=config_ref)).outputs["shards"]
        plan = options.step(parts.server_init(config_ref=config_ref, shards=shards)).outputs["plan"]
        for round_idx in range(rounds.first, rounds.stop):
            done = round_idx + 1
            plan = fl_round(config_ref=config_ref, round_idx=round_idx, configure_next=done < rounds.stop,
                            groups=round_pods(config, round_idx), shards=shards, plan=plan).output
            if eval_every and done % eval_every == 0 and done != rounds.stop:
                plan = options.step(parts.evaluate(config_ref=config_ref, final=False, shards=shards,
                                                   plan=plan)).outputs["next_plan"]
        final = options.step(parts.evaluate(config_ref=config_ref, final=True, shards=shards, plan=plan))
        saved = options.step(parts.checkpoint(config_ref=config_ref, plan=final.outputs["next_plan"]))
        options.record(parts.record(config_ref=config_ref, tracking_uri=mlflow_tracking_uri, shards=shards,
                                    checkpoint=saved.outputs["checkpoint"],
                                    evaluation=final.outputs["evaluation"]))
        return final.outputs["evaluation"]

    return pipeline


def _compile(config: ExperimentConfig, output: Path) -> Estimate:
    """Write ``config``'s segment to ``output`` and estimate what a run of it puts on a cluster."""
    try:
        compiler.Compiler().compile(build_pipeline(config), str(output))
    except OSError as error:
        raise PipelineError(f"cannot write {output}: {error.strerror}") from None
    return estimate(list(yaml.safe_load_all(output.read_text())))


def estimate_pipeline(config: ExperimentConfig) -> Estimate:
    """The pod and Workflow sizes of ``config``'s segment on a cluster, whether or not it would fit."""
    with tempfile.TemporaryDirectory(prefix="pfedla-compile-") as folder:
        return _compile(single_seed(config), Path(folder) / "pipeline.yaml")


def _one_round(config: ExperimentConfig) -> ExperimentConfig:
    return replace(config, pipeline=replace(config.pipeline, rounds_per_run=1))


def compile_pipeline(config: ExperimentConfig, output: str | Path) -> tuple[RoundRange, Estimate]:
    """Write the pipeline YAML for ``config``'s segment; returns the rounds it covers and its size estimate.

    The pipeline runs one seed: a ConfigError when ``seeds`` lists several. A PipelineError, and no
    file, when a pod or the Workflow would outgrow what Argo takes (``pfedla.workflow_size``).
    """
    config = single_seed(config)
    data_root(config)
    output = Path(output)
    if output.suffix not in (".yaml", ".yml"):  # KFP writes JSON too, but not with Kubernetes settings
        raise PipelineError(f"cannot write {output}: the pipeline file's name must end in .yaml or .yml")
    if not output.parent.is_dir():
        raise PipelineError(f"cannot write {output}: {output.parent} is not a directory")
    rounds = RoundRange.of(config)
    with tempfile.TemporaryDirectory(prefix="pfedla-compile-") as folder:
        compiled = Path(folder) / "pipeline.yaml"
        sizes = _compile(config, compiled)
        if problem := pod_problem(sizes):
            raise PipelineError(f"{problem}: raise pipeline.clients_per_pod "
                                f"(now {config.pipeline.clients_per_pod})")
        if problem := workflow_problem(sizes.workflow):
            raise PipelineError(_too_big(config, rounds, sizes, problem))
        with open(compiled, "rb") as yaml_file:  # a new file renamed over the name: never a torn YAML
            storage.write_local(output, lambda out: shutil.copyfileobj(yaml_file, out))
    return rounds, sizes


def _too_big(config: ExperimentConfig, rounds: RoundRange, sizes: Estimate, problem: str) -> str:
    """What to change when a segment's Workflow is too big: fewer rounds a run, or fewer pods a round."""
    pods = max(len(round_pods(config, r)) for r in range(rounds.first, rounds.stop))
    where = (f"the Workflow of rounds {rounds.first}..{rounds.stop - 1} ({pods} training pods a round) "
             f"{problem}")
    one = sizes if rounds.stop - rounds.first == 1 else estimate_pipeline(_one_round(config))
    fit = rounds_that_fit(one.workflow, sizes.workflow, rounds.stop - rounds.first)
    if fit == 0:
        return (f"{where}; even one round does not fit: raise pipeline.clients_per_pod "
                f"(now {config.pipeline.clients_per_pod}) so a round has fewer pods")
    return f"{where}: set pipeline.rounds_per_run to at most {fit} (now {config.pipeline.rounds_per_run})"
