"""record: the segment's rounds into the experiment's MLflow run; the last segment registers the models."""

from kfp.dsl import Artifact, Dataset, Input


def record(config_ref: str, tracking_uri: str, shards: Input[Dataset], checkpoint: Input[Artifact],
           evaluation: Input[Artifact]) -> str:
    """Log to MLflow (``tracking_uri``, else MLFLOW_TRACKING_URI from the environment); returns the run id."""
    from pfedla import steps

    return steps.record(config_ref, shards.path, checkpoint.path, evaluation.path, tracking_uri or None)
