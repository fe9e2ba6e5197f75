"""Build the per-client train/test shards of an experiment, once, from the config's seed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pfedla.config import ExperimentConfig
from pfedla.data import partition, sources
from pfedla.errors import DataError
from pfedla.models import unsupported_input
from pfedla.seeding import numpy_rng


@dataclass
class ClientShard:
    """One client's private data: disjoint train and test tensors."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train_x, self.train_y

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.test_x, self.test_y

    @property
    def num_train(self) -> int:
        return len(self.train_y)

    @property
    def num_test(self) -> int:
        return len(self.test_y)

    def to(self, device: torch.device) -> ClientShard:
        return ClientShard(*(t.to(device) for t in (self.train_x, self.train_y, self.test_x, self.test_y)))


@dataclass
class FederatedData:
    """All clients' shards plus what models need to know about the data."""

    shards: list[ClientShard]
    num_classes: int
    input_shape: tuple[int, ...]

    @property
    def num_clients(self) -> int:
        return len(self.shards)

    def class_counts(self) -> list[dict[str, list[int]]]:
        """Per client, the number of samples of each class in train and test."""
        def counts(y: torch.Tensor) -> list[int]:
            return torch.bincount(y, minlength=self.num_classes).tolist()

        return [{"train": counts(s.train_y), "test": counts(s.test_y)} for s in self.shards]


def _pooled(config: ExperimentConfig) -> sources.PooledDataset:
    if config.dataset == "digits":
        return sources.load_digits()
    directory = _local_data_dir(config)
    if config.dataset == "mnist":
        return sources.load_mnist_idx(directory, config.download)
    return sources.load_torchvision(config.dataset, directory, config.download)


def _local_data_dir(config: ExperimentConfig) -> Path:
    assert config.data_dir is not None  # validated
    if config.data_dir.startswith("s3://"):
        from pfedla import rundir, storage

        cache = Path(config.output_dir) / rundir.DATA_CACHE
        return storage.download_prefix(config.data_dir, cache)
    directory = Path(config.data_dir).expanduser()
    if not directory.is_dir() and not config.download:
        raise DataError(f"data_dir {directory} does not exist (set download: true to create it)")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def client_splits(config: ExperimentConfig, labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each client's (train, test) indices into the pooled samples: a pure function of the seed."""
    rng = numpy_rng(config.seed, "partition")
    kind = config.partition.kind
    if kind == "iid":
        parts = partition.iid(labels, config.clients, rng)
    elif kind == "dirichlet":
        parts = partition.dirichlet(labels, config.clients, config.partition.alpha, rng)
    else:
        parts = partition.pathological(
            labels, config.clients, config.partition.classes_per_client, rng
        )
    splits = []
    for indices in parts:
        train, test = partition.split_train_test(indices, labels, config.test_fraction, rng)
        if len(test) == 0:
            raise DataError("a client got no test samples: use fewer clients or a larger test_fraction")
        splits.append((train, test))
    return splits


def standardized_shards(pooled: sources.PooledDataset, splits: list[tuple[np.ndarray, np.ndarray]]
                        ) -> list[ClientShard]:
    """The clients' shards, every feature standardized with the mean and std of all train samples.

    Train samples only: statistics over the pooled set would let test samples shape what models
    train on. The union of all clients' train splits is what a federation could know (each client
    sends its count, mean and squared deviations: no sample leaves it).
    """
    rows = [(torch.from_numpy(train), torch.from_numpy(test)) for train, test in splits]
    mean, std = sources.feature_statistics(pooled.features[train] for train, _ in rows)
    return [
        ClientShard(
            sources.standardize(pooled.features[train], mean, std), pooled.labels[train],
            sources.standardize(pooled.features[test], mean, std), pooled.labels[test],
        )
        for train, test in rows
    ]


def _synthetic_shards(config: ExperimentConfig) -> list[ClientShard]:
    syn = config.synthetic
    rng = numpy_rng(config.seed, "synthetic")
    shards = []
    for x, y in sources.synthetic_clients(
        config.clients, syn.alpha, syn.beta, syn.dimension, syn.num_classes,
        syn.samples_per_client, rng,
    ):
        n_test = max(1, int(round(len(y) * config.test_fraction)))
        shards.append(ClientShard(x[n_test:], y[n_test:], x[:n_test], y[:n_test]))
    return shards


def build_federated_data(config: ExperimentConfig) -> FederatedData:
    """Load the dataset and split it over clients; a pure function of the config and seed."""
    if config.dataset == "synthetic":
        shards = _synthetic_shards(config)
        num_classes = config.synthetic.num_classes
        input_shape: tuple[int, ...] = (config.synthetic.dimension,)
    else:
        pooled = _pooled(config)
        if len(pooled.labels) < config.clients * partition.MIN_SAMPLES_PER_CLIENT:
            raise DataError(
                f"{config.dataset} has {len(pooled.labels)} samples, too few for {config.clients} clients"
            )
        input_shape = tuple(pooled.features.shape[1:])
        if problem := unsupported_input(config.model, input_shape):
            raise DataError(f"{config.dataset} in {config.data_dir}: {problem}; use model: mlp")
        shards = standardized_shards(pooled, client_splits(config, pooled.labels.numpy()))
        num_classes = pooled.num_classes
    return FederatedData(shards, num_classes, input_shape)


def class_overlap(counts: list[dict[str, list[int]]]) -> np.ndarray:
    """[N, N] matrix: 1 where two clients' train sets share at least one class."""
    present = np.array([[c > 0 for c in client["train"]] for client in counts], dtype=bool)
    return (present.astype(int) @ present.T.astype(int)) > 0
