"""Partitioners: label array -> one index array per client. Pure functions of their rng."""

from __future__ import annotations

import numpy as np

from pfedla.errors import DataError

MIN_SAMPLES_PER_CLIENT = 4


def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle all samples and deal them out in (nearly) equal parts."""
    return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_clients)]


def dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator, attempts: int = 100
) -> list[np.ndarray]:
    """Per class, split its samples over clients in Dirichlet(alpha) proportions.

    Redraws (a bounded number of times) until every client holds a usable number of samples.
    """
    classes = np.unique(labels)
    for _ in range(attempts):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        merged = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(m) for m in merged) >= MIN_SAMPLES_PER_CLIENT:
            return merged
    raise DataError(
        f"Dirichlet(alpha={alpha}) left a client with fewer than {MIN_SAMPLES_PER_CLIENT} samples "
        f"in {attempts} draws: use fewer clients or a larger partition.alpha"
    )


def assign_classes(
    num_classes: int, num_clients: int, classes_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Give each client k distinct classes, always picking among the least-used classes.

    This keeps every class in use about equally often while letting overlaps between
    clients vary (some pairs share classes, others none).
    """
    usage = np.zeros(num_classes, dtype=int)
    assignment = []
    for _ in range(num_clients):
        jitter = rng.random(num_classes)  # random tie-breaking among equally used classes
        order = np.lexsort((jitter, usage))
        chosen = np.sort(order[:classes_per_client])
        usage[chosen] += 1
        assignment.append(chosen)
    return assignment


def pathological(
    labels: np.ndarray, num_clients: int, classes_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Each client sees exactly k classes; a class's samples are shared evenly by its holders."""
    classes = np.unique(labels)
    assignment = assign_classes(len(classes), num_clients, classes_per_client, rng)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for class_index, label in enumerate(classes):
        holders = [c for c, owned in enumerate(assignment) if class_index in owned]
        if not holders:
            continue
        members = rng.permutation(np.flatnonzero(labels == label))
        for client, chunk in zip(holders, np.array_split(members, len(holders)), strict=True):
            parts[client].append(chunk)
    merged = [np.sort(np.concatenate(p)) for p in parts]
    smallest = min(len(m) for m in merged)
    if smallest < MIN_SAMPLES_PER_CLIENT:
        raise DataError(
            f"pathological partition gives a client only {smallest} samples: use fewer clients"
        )
    return merged


def split_train_test(
    indices: np.ndarray, labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's samples per class, so test classes follow the client's train classes.

    Classes with a single sample stay in train. Train and test never overlap.
    """
    train, test = [], []
    client_labels = labels[indices]
    for label in np.unique(client_labels):
        members = rng.permutation(indices[client_labels == label])
        n_test = int(round(len(members) * test_fraction)) if len(members) > 1 else 0
        n_test = min(n_test, len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
