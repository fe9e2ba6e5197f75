"""server: the first round's plan, then each round's aggregation (which plans the next round)."""

from kfp.dsl import Artifact, Dataset, Input, Output


def server_init(config_ref: str, shards: Input[Dataset], plan: Output[Artifact]):
    """A fresh server state, or the checkpoint this segment starts from, and its first round's plan."""
    from pfedla import steps

    plan.metadata.update(steps.server_init(config_ref, shards.path, plan.path))


def server_round(config_ref: str, round_idx: int, configure_next: bool, shards: Input[Dataset],
                 plan: Input[Artifact], next_plan: Output[Artifact]):
    """Fold the round's client reports (read at their fixed data-plane keys) into the server state and
    plan the next round."""
    from pfedla import steps

    summary = steps.server_round(config_ref, round_idx, configure_next, shards.path, plan.path,
                                 next_plan.path)
    next_plan.metadata.update(summary)
