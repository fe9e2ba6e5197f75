"""The pFedLA Kubeflow pipeline: partition -> plan -> R unrolled rounds -> evaluate -> checkpoint -> record.

KFP v2 has no runtime loop, so rounds are unrolled at compile time: each round is one
``fl-round`` sub-pipeline (ParallelFor over the round's training pods -> ``dsl.Collected``
fan-in -> the server step, which aggregates and plans the next round, so the server state is
read once per round). The round's clients are a seeded draw known at compile time, so each
round's pods are listed in the YAML. One pipeline run (a *segment*) covers at most
``pipeline.rounds_per_run`` rounds; longer experiments chain segments through the
checkpoints the ``checkpoint`` step writes to the data plane (``pfedla_pipelines.runner`` runs them).
"""


import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes

from pfedla import storage
from pfedla.config import ExperimentConfig, single_seed
from pfedla.dataplane import data_root
from pfedla.errors import PfedlaError
from pfedla.images import step_image
from pfedla.steps import round_pods
from pfedla_components import Components, build_components

S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# The server step's executor input lists every training pod's update artifact (URI, metadata: about
# 400 bytes each), and the launcher receives it as one command-line argument, which Linux caps at
# 128 KiB (MAX_ARG_STRLEN). Staying well below keeps a round's fan-in launchable.
MAX_PODS_PER_ROUND = 200
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
        """Client training: GPU when asked for, retried when its pod dies or overruns its deadline."""
        self.step(task)
        if self.pipe.client_retries:
            task.set_retry(num_retries=self.pipe.client_retries, backoff_duration="30s", backoff_factor=2.0)
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
    config_json = config.to_json()
    deadline = config.pipeline.segment_timeout or None  # the whole run, Pending pods included

    @dsl.pipeline(name="fl-round", description="One round: train its clients, aggregate, plan the next.")
    def fl_round(config_json: str, round_idx: int, configure_next: bool, groups: list[str],
                 shards: dsl.Input[dsl.Dataset], plan: dsl.Input[dsl.Artifact]) -> dsl.Artifact:
        with dsl.ParallelFor(groups, parallelism=config.pipeline.parallelism) as group:
            train = options.client(parts.client_train(config_json=config_json, clients=group, plan=plan))
        server = options.step(parts.server_round(
            config_json=config_json, round_idx=round_idx, configure_next=configure_next, shards=shards,
            plan=plan, updates=dsl.Collected(train.outputs["update"])))
        return server.outputs["next_plan"]

    @dsl.pipeline(
        name=pipeline_name(config),
        description=f"{config.pipeline.algorithm} rounds {rounds.first}..{rounds.stop - 1} of {rounds.total}",
        pipeline_config=dsl.PipelineConfig(active_deadline_seconds=deadline),
    )
    def pipeline(config_json: str = config_json,
                 mlflow_tracking_uri: str = config.pipeline.mlflow_tracking_uri or "") -> dsl.Artifact:
        shards = options.step(parts.partition(config_json=config_json)).outputs["shards"]
        plan = options.step(parts.server_init(config_json=config_json, shards=shards)).outputs["plan"]
        for round_idx in range(rounds.first, rounds.stop):
            done = round_idx + 1
            plan = fl_round(config_json=config_json, round_idx=round_idx, configure_next=done < rounds.stop,
                            groups=round_pods(config, round_idx), shards=shards, plan=plan).output
            if eval_every and done % eval_every == 0 and done != rounds.stop:
                plan = options.step(parts.evaluate(config_json=config_json, final=False, shards=shards,
                                                   plan=plan)).outputs["next_plan"]
        final = options.step(parts.evaluate(config_json=config_json, final=True, shards=shards, plan=plan))
        saved = options.step(parts.checkpoint(config_json=config_json, plan=final.outputs["next_plan"]))
        options.record(parts.record(config_json=config_json, tracking_uri=mlflow_tracking_uri, shards=shards,
                                    checkpoint=saved.outputs["checkpoint"],
                                    evaluation=final.outputs["evaluation"]))
        return final.outputs["evaluation"]

    return pipeline


def compile_pipeline(config: ExperimentConfig, output: str | Path) -> RoundRange:
    """Write the pipeline YAML for ``config``'s segment; returns the rounds it covers. The pipeline runs
    one seed: a ConfigError when ``seeds`` lists several."""
    config = single_seed(config)
    data_root(config)
    output = Path(output)
    if output.suffix not in (".yaml", ".yml"):  # KFP writes JSON too, but not with Kubernetes settings
        raise PipelineError(f"cannot write {output}: the pipeline file's name must end in .yaml or .yml")
    if not output.parent.is_dir():
        raise PipelineError(f"cannot write {output}: {output.parent} is not a directory")
    rounds = RoundRange.of(config)
    pods = max(len(round_pods(config, r)) for r in range(rounds.first, rounds.stop))
    if pods > MAX_PODS_PER_ROUND:
        raise PipelineError(f"a round would run {pods} training pods; the server step's launcher cannot take "
                            f"more than about {MAX_PODS_PER_ROUND} collected updates: raise "
                            f"pipeline.clients_per_pod to at least "
                            f"{-(-pods * config.pipeline.clients_per_pod // MAX_PODS_PER_ROUND)}")
    pipeline = build_pipeline(config)
    # compiled aside, then written under its name at once: a kill never leaves a truncated YAML there
    with tempfile.TemporaryDirectory(prefix="pfedla-compile-") as folder:
        compiled = Path(folder) / f"pipeline{output.suffix}"
        compiler.Compiler().compile(pipeline, str(compiled))
        storage.copy(compiled, output)  # a new file renamed over the name: a StorageError naming output
    return rounds
