"""Datasets and partitioners: one seeded, computed-once split of data over clients."""

from pfedla.data.federated import ClientShard, FederatedData, build_federated_data

__all__ = ["ClientShard", "FederatedData", "build_federated_data"]
