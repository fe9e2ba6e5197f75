"""server: initialise the state, configure each round, aggregate the collected updates."""

from typing import List

from kfp.dsl import Artifact, Dataset, Input, Output


def server_init(config_json: str, shards: Input[Dataset], state: Output[Artifact]):
    """A fresh server state, or the checkpoint named by pipeline.resume_from."""
    from pfedla import steps

    state.metadata["next_round"] = steps.server_init(config_json, shards.path, state.path)


def server_configure(config_json: str, round_idx: int, shards: Input[Dataset], state: Input[Artifact],
                     models: Output[Artifact]) -> List[int]:
    """Draw the round's clients (seeded) and write each one's personalized start model."""
    from pfedla import steps

    return steps.server_configure(config_json, round_idx, shards.path, state.path, models.path)


def server_aggregate(config_json: str, round_idx: int, shards: Input[Dataset], state: Input[Artifact],
                     updates: Input[List[Artifact]], new_state: Output[Artifact]):
    """Fold the round's collected client updates into the server state."""
    from pfedla import steps

    metrics = steps.server_aggregate(config_json, round_idx, shards.path, state.path,
                                     [update.path for update in updates], new_state.path)
    new_state.metadata.update({"round": round_idx, **metrics})
