"""client_train: one pod trains its group of clients, each from its own start model and train split."""

from kfp.dsl import Artifact, Input, Output


def client_train(config_ref: str, clients: str, plan: Input[Artifact], update: Output[Artifact]):
    """Train ``clients`` (ids like ``3,7``) and report each one's update Δ = θ' − θ̄ or why it failed."""
    from pfedla import steps

    update.metadata.update(steps.client_train(config_ref, clients, plan.path, update.path))
