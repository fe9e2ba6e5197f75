"""partition: the config into the data plane, then dataset -> one train and one test object per client."""

from kfp.dsl import Dataset, Output


def partition(config_json: str, config_ref: str, shards: Output[Dataset]):
    """Write the config where ``config_ref`` points (later steps get only the reference), then split the
    configured dataset over clients; ``shards`` is the manifest of their objects."""
    from pfedla import steps

    shards.metadata.update(steps.partition(config_json, config_ref, shards.path))
