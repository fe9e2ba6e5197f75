"""The pFedLA Kubeflow pipeline: partition -> R unrolled rounds -> evaluate -> record.

KFP v2 has no runtime loop, so rounds are unrolled at compile time: each round is one
``fl-round`` sub-pipeline (server configure -> ParallelFor over the round's clients ->
``dsl.Collected`` fan-in -> server aggregate). A pipeline covers at most
``pipeline.rounds_per_run`` rounds; longer experiments chain runs through the server
checkpoint (``pipeline.checkpoint_to`` -> ``pipeline.resume_from``).
"""


import builtins
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes

from pfedla.config import ExperimentConfig
from pfedla.errors import PfedlaError
from pfedla.images import step_image
from pfedla.simulation import AlgorithmResult
from pfedla_components import Components, build_components

S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
ENDPOINT_KEYS = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
MLFLOW_AUTH_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


class PipelineError(PfedlaError):
    """The pipeline could not be compiled, run or submitted."""


@dataclass(frozen=True)
class RoundRange:
    """The rounds one pipeline run covers: [first, stop) of ``total``."""

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


class TaskOptions:
    """Every per-task Kubernetes setting, applied in one place."""

    def __init__(self, config: ExperimentConfig):
        self.pipe = config.pipeline

    def _base(self, task: Any, cacheable: bool = True) -> Any:
        task.set_cpu_request(self.pipe.cpu_request).set_memory_request(self.pipe.memory_request)
        task.set_caching_options(self.pipe.caching and cacheable)
        return task

    def _endpoints(self, task: Any) -> None:
        kubernetes.use_config_map_as_env(task, self.pipe.endpoints_config_map,
                                         {key: key for key in ENDPOINT_KEYS})

    def _s3_credentials(self, task: Any) -> None:
        kubernetes.use_secret_as_env(task, self.pipe.s3_secret, {key: key for key in S3_KEYS})

    def plain(self, task: Any) -> Any:
        """Server and evaluation steps: artifacts only, no credentials."""
        return self._base(task)

    def storage(self, task: Any) -> Any:
        """Steps that may read s3:// data or checkpoints."""
        self._base(task)
        self._endpoints(task)
        self._s3_credentials(task)
        return task

    def client(self, task: Any) -> Any:
        """Client training: GPU when asked for, retried when its pod dies or overruns its deadline."""
        self._base(task)
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
        """The MLflow step: endpoints, S3 (for checkpoint_to) and optional MLflow auth; never cached."""
        self.storage(task)
        task.set_caching_options(False)
        if self.pipe.mlflow_secret:
            kubernetes.use_secret_as_env(task, self.pipe.mlflow_secret, {k: k for k in MLFLOW_AUTH_KEYS})
        return task


def default_image(config: ExperimentConfig) -> str:
    return config.pipeline.image or step_image("cuda" if config.pipeline.gpus_per_client else "cpu")


def build_pipeline(config: ExperimentConfig) -> Callable:
    """The pipeline function for ``config`` (rounds unrolled for this run's RoundRange)."""
    parts: Components = build_components(default_image(config))
    options = TaskOptions(config)
    rounds = RoundRange.of(config)
    eval_every = config.pipeline.eval_every
    config_json = json.dumps(config.to_dict(), sort_keys=True)

    @dsl.pipeline(name="fl-round", description="One pFedLA round: configure, train clients, aggregate.")
    def fl_round(config_json: str, round_idx: int, shards: dsl.Input[dsl.Dataset],
                 state: dsl.Input[dsl.Artifact]) -> dsl.Artifact:
        plan = options.plain(parts.server_configure(config_json=config_json, round_idx=round_idx,
                                                    shards=shards, state=state))
        with dsl.ParallelFor(plan.outputs["Output"], parallelism=config.pipeline.parallelism) as client:
            train = options.client(parts.client_train(config_json=config_json, round_idx=round_idx,
                                                      client_id=client, shards=shards,
                                                      models=plan.outputs["models"]))
        merged = options.plain(parts.server_aggregate(config_json=config_json, round_idx=round_idx,
                                                      shards=shards, state=state,
                                                      updates=dsl.Collected(train.outputs["update"])))
        return merged.outputs["new_state"]

    @dsl.pipeline(
        name=f"pfedla-{config.pipeline.algorithm.replace('_', '-')}",
        description=f"{config.pipeline.algorithm} rounds {rounds.first}..{rounds.stop - 1} of {rounds.total}",
    )
    def pipeline(config_json: str = config_json,
                 mlflow_tracking_uri: str = config.pipeline.mlflow_tracking_uri or "") -> dsl.Artifact:
        shards = options.storage(parts.partition(config_json=config_json)).outputs["shards"]
        state = options.storage(parts.server_init(config_json=config_json, shards=shards)).outputs["state"]
        for round_idx in range(rounds.first, rounds.stop):
            state = fl_round(config_json=config_json, round_idx=round_idx, shards=shards, state=state).output
            done = round_idx + 1
            if eval_every and done % eval_every == 0 and done != rounds.stop:
                state = options.plain(parts.evaluate(config_json=config_json, shards=shards,
                                                     state=state)).outputs["new_state"]
        final = options.plain(parts.evaluate(config_json=config_json, shards=shards, state=state))
        options.record(parts.record(config_json=config_json, tracking_uri=mlflow_tracking_uri, shards=shards,
                                    state=final.outputs["new_state"], evaluation=final.outputs["evaluation"]))
        return final.outputs["evaluation"]

    return pipeline


def compile_pipeline(config: ExperimentConfig, output: str | Path) -> RoundRange:
    """Write the pipeline YAML for ``config``; returns the rounds it covers."""
    compiler.Compiler().compile(build_pipeline(config), str(output))
    return RoundRange.of(config)


def run_local(config: ExperimentConfig, pipeline_root: str | Path | None = None) -> dict[str, Any]:
    """Run the pipeline without a cluster (kfp.local, one subprocess per step).

    Writes ``summary.json`` (same shape as ``pfedla run``'s, for the pipeline's algorithm)
    and, for pFedLA, ``layer_weights.npy`` into ``config.output_dir``; returns the summary.
    """
    from kfp import local

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    root = Path(pipeline_root) if pipeline_root else Path(tempfile.mkdtemp(prefix="pfedla-kfp-"))
    local_config = _local_variant(config)
    # kfp.local patches print while it runs ParallelFor; restore it whatever happens.
    original_print = builtins.print
    started = time.perf_counter()
    try:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
                   raise_on_error=True)
        task = build_pipeline(local_config)()
    except Exception as error:  # kfp raises plain RuntimeError with the failing task's name
        raise PipelineError(f"local pipeline run failed: {error}") from error
    finally:
        builtins.print = original_print
    evaluation_dir = Path(task.output.path)
    evaluation = json.loads((evaluation_dir / "evaluation.json").read_text())
    result = AlgorithmResult(
        name=config.pipeline.algorithm, client_accuracies=evaluation["client_accuracies"],
        mean_accuracy=evaluation["mean_accuracy"], rounds=evaluation["rounds"],
        wall_seconds=time.perf_counter() - started,
    )
    summary = {result.name: {**result.summary(), "orchestration": "kfp.local"}}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if (evaluation_dir / "layer_weights.npy").is_file():
        shutil.copy(evaluation_dir / "layer_weights.npy", output_dir / "layer_weights.npy")
    return summary


def _local_variant(config: ExperimentConfig) -> ExperimentConfig:
    """Locally, ParallelFor threads race on kfp's patched print: run clients one at a time."""
    from dataclasses import replace

    return replace(config, pipeline=replace(config.pipeline, parallelism=1))


def submit(config: ExperimentConfig, host: str, experiment: str | None = None) -> str:
    """Compile and submit to a Kubeflow Pipelines API server; returns the run id."""
    import kfp

    try:
        client = kfp.Client(host=host)
    except Exception as error:  # connection refused, DNS, TLS, auth: all surface here
        raise PipelineError(f"cannot reach the Kubeflow Pipelines API at {host}: {error}") from None
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "pipeline.yaml"
        rounds = compile_pipeline(config, package)
        try:
            run = client.create_run_from_pipeline_package(
                str(package), arguments={}, experiment_name=experiment or config.experiment_name,
                run_name=f"{config.pipeline.algorithm}-r{rounds.first}-{rounds.stop}",
                service_account=config.pipeline.service_account,
            )
        except Exception as error:
            raise PipelineError(f"the Kubeflow Pipelines API at {host} refused the run: {error}") from None
    return run.run_id
