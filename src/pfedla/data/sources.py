"""Dataset sources, each returning whole tensors (no per-sample Python later on)."""

from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pfedla.errors import DataError
from pfedla.registry import DATASETS

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_CLASSES = DATASETS["mnist"].num_classes


@dataclass
class PooledDataset:
    """All samples of a dataset in one place, before partitioning.

    The features are raw values: they are standardized only once split into clients' train and
    test samples (``pfedla.data.federated``), with statistics of the train samples alone.
    """

    features: torch.Tensor  # float32 [n, channels, height, width] or [n, dim]
    labels: torch.Tensor  # int64 [n]
    num_classes: int


def raw_features(images: np.ndarray) -> torch.Tensor:
    """uint8/float images -> float32 tensor of the same values."""
    return torch.from_numpy(np.ascontiguousarray(images)).float()


def feature_statistics(parts: Iterable[torch.Tensor]) -> tuple[float, float]:
    """Mean and (unbiased) standard deviation of all values of ``parts`` taken together.

    Each part is summarised on its own (count, mean, sum of squared deviations, in float64) and
    the summaries are merged (Chan et al.'s pairwise update), so no concatenated copy is made and
    each part could as well be summarised where it lives.
    """
    count, mean, squares = 0, 0.0, 0.0
    for part in parts:
        n = part.numel()
        if n == 0:
            continue
        values = part.double()
        part_mean = float(values.mean())
        part_squares = float((values - part_mean).square().sum())
        delta, total = part_mean - mean, count + n
        mean += delta * n / total
        squares += part_squares + delta * delta * count * n / total
        count = total
    if count == 0:
        raise DataError("no values to compute the normalization statistics from")
    return mean, max(math.sqrt(squares / max(count - 1, 1)), 1e-8)


def standardize(features: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``features`` shifted by ``mean`` and scaled by ``std`` (zero mean, unit variance where those
    are the features' own statistics)."""
    return (features - mean) / std


def load_digits() -> PooledDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images): offline, the default."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = bunch.images.reshape(-1, 1, 8, 8)
    return PooledDataset(raw_features(images), torch.from_numpy(bunch.target).long(), 10)


def _open_maybe_gz(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as error:  # zlib.error: a corrupt deflate stream
        raise DataError(f"cannot read {path}: {error}") from None


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (the MNIST format), checking its header against its size."""
    data = _open_maybe_gz(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(shape)  # Python ints: np.prod wraps around for dimensions like 2**16 x 4
    if len(data) - header != expected:
        raise DataError(f"{path}: header promises {expected} values, file holds {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for folder in (directory, directory / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def check_labels(labels: np.ndarray, num_classes: int, source: object) -> None:
    """Raise DataError naming ``source`` unless every label is a class index in [0, num_classes)."""
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.size:
        raise DataError(f"{source}: labels must be class indices in [0, {num_classes}), found "
                        f"{outside.size} outside it (e.g. {int(outside[0])})")


def _size(images: np.ndarray) -> str:
    return "x".join(map(str, images.shape[1:]))


def _read_mnist_split(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One split's images [n, height, width] and labels [n], checked against each other."""
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or 0 in images.shape[1:]:
        raise DataError(f"{image_path}: MNIST images must be 3-D [count, height, width] with at least "
                        f"one pixel, got shape {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{label_path}: MNIST labels must be 1-D [count], got shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{image_path}: {len(images)} images but {label_path} holds {len(labels)} labels")
    check_labels(labels, MNIST_CLASSES, label_path)
    return images, labels


def load_mnist_idx(directory: Path, download: bool) -> PooledDataset:
    """MNIST from IDX(.gz) files; the train pair, the test pair or both may be present."""
    if not any(_find_idx(directory, images) for images, _ in IDX_FILES.values()) and download:
        import torchvision

        torchvision.datasets.MNIST(str(directory), train=True, download=True)
        torchvision.datasets.MNIST(str(directory), train=False, download=True)
    images, labels, image_paths = [], [], []
    for split, (image_stem, label_stem) in IDX_FILES.items():
        image_path, label_path = _find_idx(directory, image_stem), _find_idx(directory, label_stem)
        if image_path is None and label_path is None:
            continue
        if image_path is None or label_path is None:
            raise DataError(f"{directory}: MNIST {split} images and labels must come as a pair")
        split_images, split_labels = _read_mnist_split(image_path, label_path)
        if images and split_images.shape[1:] != images[0].shape[1:]:
            raise DataError(f"{image_path} holds {_size(split_images)} images but {image_paths[0]} holds "
                            f"{_size(images[0])} images: the train and test images must have one size")
        images.append(split_images)
        labels.append(split_labels)
        image_paths.append(image_path)
    if not images:
        raise DataError(
            f"no MNIST IDX files in {directory} (expected e.g. t10k-images-idx3-ubyte.gz and "
            "t10k-labels-idx1-ubyte.gz); set download: true to fetch them"
        )
    pixels = np.concatenate(images)[:, None, :, :]
    return PooledDataset(raw_features(pixels), torch.from_numpy(np.concatenate(labels)).long(), MNIST_CLASSES)


def load_torchvision(name: str, directory: Path, download: bool) -> PooledDataset:
    """FashionMNIST, EMNIST (byclass), CIFAR-10/100 through torchvision, train and test pooled."""
    import torchvision.datasets as tvd

    makers = {
        "fmnist": lambda train: tvd.FashionMNIST(str(directory), train=train, download=download),
        "emnist": lambda train: tvd.EMNIST(str(directory), "byclass", train=train, download=download),
        "cifar10": lambda train: tvd.CIFAR10(str(directory), train=train, download=download),
        "cifar100": lambda train: tvd.CIFAR100(str(directory), train=train, download=download),
    }
    make, num_classes = makers[name], DATASETS[name].num_classes
    try:
        parts = [make(True), make(False)]
    except RuntimeError as error:  # torchvision's "Dataset not found" when download is off
        raise DataError(f"{name} not found in {directory}: {error} (set download: true)") from None
    pixels = [np.asarray(p.data) for p in parts]
    labels = np.concatenate([np.asarray(p.targets) for p in parts])
    check_labels(labels, num_classes, f"{name} in {directory}")
    if pixels[0].shape[1:] != pixels[1].shape[1:]:
        raise DataError(f"{name} in {directory}: train images are {_size(pixels[0])} but test images "
                        f"{_size(pixels[1])}: they must have one size")
    images = np.concatenate(pixels)
    images = images.transpose(0, 3, 1, 2) if images.ndim == 4 else images[:, None, :, :]
    return PooledDataset(raw_features(images), torch.from_numpy(labels).long(), num_classes)


def synthetic_clients(
    num_clients: int,
    alpha: float,
    beta: float,
    dimension: int,
    num_classes: int,
    samples_per_client: int,
    rng: np.random.Generator,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """FedProx-style synthetic(alpha, beta): each client has its own softmax model and inputs.

    alpha controls how much the clients' models differ, beta how much their inputs differ.
    """
    covariance = np.arange(1, dimension + 1, dtype=np.float64) ** -1.2
    clients = []
    for _ in range(num_clients):
        model_mean = rng.normal(0.0, np.sqrt(alpha)) if alpha > 0 else 0.0
        input_mean = rng.normal(0.0, np.sqrt(beta)) if beta > 0 else 0.0
        weights = rng.normal(model_mean, 1.0, size=(dimension, num_classes))
        bias = rng.normal(model_mean, 1.0, size=num_classes)
        centre = rng.normal(input_mean, 1.0, size=dimension)
        inputs = rng.normal(centre, np.sqrt(covariance), size=(samples_per_client, dimension))
        labels = np.argmax(inputs @ weights + bias, axis=1)
        clients.append((torch.from_numpy(inputs).float(), torch.from_numpy(labels).long()))
    return clients
