"""partition: dataset -> one train and one test object per client in the data plane."""

from kfp.dsl import Dataset, Output


def partition(config_json: str, shards: Output[Dataset]):
    """Split the configured dataset over clients; ``shards`` is the manifest of their objects."""
    from pfedla import steps

    shards.metadata.update(steps.partition(config_json, shards.path))
