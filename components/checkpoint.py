"""checkpoint: the segment's final state, versioned in the data plane for the next segment."""

from kfp.dsl import Artifact, Input, Output


def checkpoint(config_ref: str, plan: Input[Artifact], checkpoint: Output[Artifact]):
    """Copy the state to ``checkpoints/round_<r>/`` (inside the store) and move the LATEST pointer."""
    from pfedla import steps

    checkpoint.metadata.update(steps.checkpoint(config_ref, plan.path, checkpoint.path))
