"""partition: dataset -> per-client shards and partition stats."""

from kfp.dsl import Dataset, Output


def partition(config_json: str, shards: Output[Dataset]):
    """Split the configured dataset over clients (one file per client) and record class counts."""
    from pfedla import steps

    meta = steps.partition(config_json, shards.path)
    shards.metadata.update(meta)
