"""client_train: one client's local training from its own personalized model and shard."""

from kfp.dsl import Artifact, Dataset, Input, Output


def client_train(config_json: str, round_idx: int, client_id: int, shards: Input[Dataset],
                 models: Input[Artifact], update: Output[Artifact]):
    """Train client ``client_id`` and emit its update Δ = θ' − θ̄ (or the reason it failed)."""
    from pfedla import steps

    loss = steps.client_train(config_json, round_idx, client_id, shards.path, models.path, update.path)
    update.metadata.update({"client_id": client_id, "round": round_idx, "failed": loss is None,
                            "train_loss": loss})
