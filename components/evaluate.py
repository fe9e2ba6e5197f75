"""evaluate: every client's personalized model on its own test split."""

from kfp.dsl import Artifact, Dataset, Input, Output


def evaluate(config_json: str, shards: Input[Dataset], state: Input[Artifact], new_state: Output[Artifact],
             evaluation: Output[Artifact]):
    """Accuracies, α and personalized models; the state passes through with the result in its history."""
    from pfedla import steps

    metrics = steps.evaluate(config_json, shards.path, state.path, new_state.path, evaluation.path)
    evaluation.metadata.update(metrics)
