"""evaluate: every client's personalized model on its own test split."""

from kfp.dsl import Artifact, Dataset, Input, Output


def evaluate(config_ref: str, final: bool, shards: Input[Dataset], plan: Input[Artifact],
             next_plan: Output[Artifact], evaluation: Output[Artifact]):
    """Accuracies (and, when ``final``, models and α); the plan passes through with them in its history."""
    from pfedla import steps

    evaluation.metadata.update(steps.evaluate(config_ref, shards.path, plan.path, next_plan.path,
                                              evaluation.path, final))
