"""Sources and partitioners: seeded, computed once, disjoint train/test, the promised classes."""

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_errors import error_line, run_cli
from idx_files import fingerprint, idx_bytes, write_idx
from pfedla.cli import main
from pfedla.config import config_from_dict
from pfedla.data import build_federated_data
from pfedla.data import partition as part
from pfedla.data.federated import class_overlap, client_splits, standardized_shards
from pfedla.data.sources import PooledDataset, feature_statistics, load_digits, read_idx
from pfedla.errors import DataError

SHARED_MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological"])
def test_splits_are_pure_functions_of_the_seed(kind):
    config = config_from_dict({"partition": {"kind": kind}, "clients": 7})
    first, second = build_federated_data(config), build_federated_data(config)
    assert fingerprint(first) == fingerprint(second)
    other = build_federated_data(config_from_dict({"partition": {"kind": kind}, "clients": 7, "seed": 1}))
    assert fingerprint(first) != fingerprint(other)


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological"])
def test_every_sample_used_at_most_once_and_train_test_disjoint(kind):
    labels = load_digits().labels.numpy()
    rng = np.random.default_rng(0)
    if kind == "iid":
        parts = part.iid(labels, 9, rng)
    elif kind == "dirichlet":
        parts = part.dirichlet(labels, 9, 0.3, rng)
    else:
        parts = part.pathological(labels, 9, 3, rng)
    merged = np.concatenate(parts)
    assert len(merged) == len(np.unique(merged))
    if kind != "pathological":
        assert len(merged) == len(labels)
    for indices in parts:
        train, test = part.split_train_test(indices, labels, 0.25, rng)
        assert set(train).isdisjoint(test)
        assert set(train) | set(test) == set(indices)
        assert set(labels[test]) <= set(labels[train])


def test_pathological_gives_exactly_k_classes_and_balanced_usage():
    config = config_from_dict({"clients": 10, "partition": {"kind": "pathological", "classes_per_client": 2}})
    counts = build_federated_data(config).class_counts()
    held = np.array([[c > 0 for c in client["train"]] for client in counts])
    assert (held.sum(1) == 2).all()
    assert (held.sum(0) == 2).all()  # 10 clients x 2 classes over 10 classes
    for client in counts:  # test classes follow train classes
        assert all(t == 0 or r > 0 for r, t in zip(client["train"], client["test"]))
    overlap = class_overlap(counts)
    assert overlap.diagonal().all()
    assert not overlap.all()  # some pairs share no class


def test_dirichlet_small_alpha_is_skewed_and_impossible_request_errors():
    labels = load_digits().labels.numpy()
    parts = part.dirichlet(labels, 5, 0.05, np.random.default_rng(0))
    dominant = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    assert np.mean(dominant) > 0.4
    with pytest.raises(DataError, match="partition.alpha"):
        part.dirichlet(labels[:30], 10, 0.01, np.random.default_rng(0), attempts=3)


def test_synthetic_any_number_of_clients():
    config = config_from_dict({"dataset": "synthetic", "model": "mlp", "clients": 37,
                               "synthetic": {"samples_per_client": 20, "dimension": 12}})
    data = build_federated_data(config)
    assert data.num_clients == 37 and data.input_shape == (12,)
    assert all(s.num_train + s.num_test == 20 for s in data.shards)
    assert fingerprint(data) == fingerprint(build_federated_data(config))


def test_mnist_from_a_directory_with_only_the_test_files(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (200, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(200) % 10)
    config = config_from_dict({"dataset": "mnist", "data_dir": str(tmp_path), "clients": 4,
                               "partition": {"kind": "iid"}})
    data = build_federated_data(config)
    assert data.input_shape == (1, 28, 28)
    assert sum(s.num_train + s.num_test for s in data.shards) == 200


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="the shared MNIST test set is only beside the repo")
def test_shared_mnist_test_set_reads(tmp_path):
    shutil.copy(SHARED_MNIST / "t10k-labels-idx1-ubyte.gz", tmp_path)
    labels = read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))


def test_corrupt_or_missing_mnist_gives_data_errors(tmp_path):
    config = config_from_dict({"dataset": "mnist", "data_dir": str(tmp_path)})
    with pytest.raises(DataError, match="no MNIST IDX files"):
        build_federated_data(config)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((10, 28, 28)))
    with pytest.raises(DataError, match="as a pair"):
        build_federated_data(config)
    header_says_100 = b"\x00\x00\x08\x01\x00\x00\x00\x64"
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header_says_100 + b"abc"))
    with pytest.raises(DataError, match="header promises 100"):
        build_federated_data(config)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        build_federated_data(config)
    missing = config_from_dict({"dataset": "mnist", "data_dir": str(tmp_path / "nope")})
    with pytest.raises(DataError, match="does not exist"):
        build_federated_data(missing)


def test_digits_load_as_float_tensors_of_their_raw_values():
    from sklearn.datasets import load_digits as sklearn_digits

    pooled = load_digits()
    assert pooled.features.shape == (1797, 1, 8, 8) and pooled.features.dtype == torch.float32
    assert torch.equal(pooled.features, torch.from_numpy(sklearn_digits().images).float()[:, None])


def test_feature_statistics_of_parts_equal_those_of_their_concatenation():
    generator = torch.Generator().manual_seed(0)
    parts = [torch.rand(n, 3, generator=generator) * 50 + 1000 for n in (1, 7, 0, 40)]  # far from zero
    mean, std = feature_statistics(parts)
    whole = torch.cat(parts).double()
    assert mean == pytest.approx(float(whole.mean()), rel=1e-12)
    assert std == pytest.approx(float(whole.std()), rel=1e-9)


def test_normalization_statistics_come_from_the_train_splits_only():
    """Test pixels must not shape what clients train on: the mean and std come from the union of all
    clients' train splits, and both splits are scaled with them."""
    config = config_from_dict({"clients": 5, "partition": {"kind": "dirichlet", "alpha": 0.5}})
    pooled = load_digits()
    splits = client_splits(config, pooled.labels.numpy())
    shards = standardized_shards(pooled, splits)
    values = torch.cat([s.train_x.flatten() for s in shards]).double()
    assert abs(float(values.mean())) < 1e-5 and float(values.std()) == pytest.approx(1.0, abs=1e-5)
    raw_train = pooled.features[torch.from_numpy(np.concatenate([train for train, _ in splits]))].double()
    mean, std = float(raw_train.mean()), float(raw_train.std())
    for (_, test), shard in zip(splits, shards, strict=True):  # test samples: scaled like the train ones
        torch.testing.assert_close(shard.test_x, (pooled.features[torch.from_numpy(test)] - mean) / std)
    test_rows = torch.from_numpy(np.concatenate([test for _, test in splits]))
    changed = PooledDataset(pooled.features.clone(), pooled.labels, pooled.num_classes)
    changed.features[test_rows] = changed.features[test_rows] * 3 + 7  # only test pixels change
    for before, after in zip(shards, standardized_shards(changed, splits), strict=True):
        assert torch.equal(before.train_x, after.train_x)
        assert not torch.equal(before.test_x, after.test_x)
    built = build_federated_data(config)  # what both orchestrations use
    for made, expected in zip(built.shards, shards, strict=True):
        assert torch.equal(made.train_x, expected.train_x) and torch.equal(made.test_x, expected.test_x)


# -- damaged or unusable IDX files: one error line naming the file, before any training ----------------------

IMAGES, LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"


def mnist_run(data_dir, out, *overrides):
    return ["run", "--quiet", "--set", "dataset=mnist", "--set", f"data_dir={data_dir}", "--set", "clients=4",
            "--set", "partition.kind=iid", "--set", "rounds=1", "--set", "algorithms=[local]",
            "--set", f"output_dir={out}", *overrides]


def write_mnist(directory, images, labels, split="t10k"):
    directory.mkdir(exist_ok=True)
    write_idx(directory / f"{split}-images-idx3-ubyte.gz", images)
    write_idx(directory / f"{split}-labels-idx1-ubyte.gz", labels)
    return directory


def corrupt_deflate(raw):
    """A gzip file whose first deflate block has the invalid block type 11 (zlib.error, not BadGzipFile)."""
    data = bytearray(gzip.compress(raw))
    data[10] = 0b111  # the byte after gzip's 10-byte header: BFINAL=1, BTYPE=11
    return bytes(data)


def test_a_corrupt_deflate_stream_is_one_error_line_naming_the_file(tmp_path):
    write_mnist(tmp_path, np.zeros((200, 28, 28)), np.arange(200) % 10)
    (tmp_path / IMAGES).write_bytes(corrupt_deflate(idx_bytes(np.zeros((200, 28, 28)))))
    result = run_cli(*mnist_run(tmp_path, tmp_path / "out"))
    line = error_line(result.returncode, result.stderr)
    assert line == f"pfedla: error: cannot read {tmp_path / IMAGES}: Error -3 while decompressing data: " \
                   "invalid block type"


def test_idx_dimensions_whose_product_overflows_int64_are_compared_exactly(tmp_path):
    """2**16 x 4 dimensions are 2**64 values: np.prod wrapped to 0, which matched an empty body."""
    (tmp_path / "x.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 4]) + (2**16).to_bytes(4, "big") * 4))
    with pytest.raises(DataError, match=f"x.gz: header promises {2**64} values, file holds 0$"):
        read_idx(tmp_path / "x.gz")
    (tmp_path / "y.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + b"\xff\xff\xff\xff" * 3 + b"abc"))
    with pytest.raises(DataError, match=f"y.gz: header promises {(2**32 - 1) ** 3} values, file holds 3$"):
        read_idx(tmp_path / "y.gz")


@pytest.mark.parametrize(
    ("damage", "problem"),
    [("truncated", "header promises 156800 values, file holds 4984"),
     ("empty gzip", "is not an unsigned-byte IDX file (bad magic number)"),
     ("empty file", "is not an unsigned-byte IDX file (bad magic number)"),
     ("cut gzip", "Compressed file ended before the end-of-stream marker was reached")])
def test_truncated_and_empty_idx_files_stay_one_error_line(tmp_path, capsys, damage, problem):
    data_dir = write_mnist(tmp_path / "mnist", np.zeros((200, 28, 28)), np.arange(200) % 10)
    body = idx_bytes(np.zeros((200, 28, 28)))
    damaged = {"truncated": gzip.compress(body[:5000]), "empty gzip": gzip.compress(b""), "empty file": b"",
               "cut gzip": gzip.compress(body)[:-9]}
    (data_dir / IMAGES).write_bytes(damaged[damage])
    line = error_line(main(mnist_run(data_dir, tmp_path / "out")), capsys.readouterr().err)
    assert str(data_dir / IMAGES) in line and line.endswith(problem)


@pytest.mark.parametrize(
    ("images", "labels", "named", "problem"),
    [
        (np.zeros((200, 784)), np.arange(200) % 10, IMAGES,
         "MNIST images must be 3-D [count, height, width] with at least one pixel, got shape (200, 784)"),
        (np.zeros((200, 28, 28)), (np.arange(400) % 10).reshape(200, 2), LABELS,
         "MNIST labels must be 1-D [count], got shape (200, 2)"),
        (np.zeros((200, 28, 28)), np.arange(200) % 12, LABELS,
         "labels must be class indices in [0, 10), found 32 outside it (e.g. 10)"),
    ],
    ids=["2-D images", "2-D labels", "label 10 and 11"],
)
def test_idx_arrays_of_the_wrong_shape_or_labels_are_one_error_line(tmp_path, capsys, images, labels, named,
                                                                     problem):
    data_dir = write_mnist(tmp_path / "mnist", images, labels)
    code = main(mnist_run(data_dir, tmp_path / "out"))
    assert error_line(code, capsys.readouterr().err) == f"pfedla: error: {data_dir / named}: {problem}"


def test_train_and_test_images_of_different_sizes_are_one_error_line(tmp_path, capsys):
    data_dir = write_mnist(tmp_path / "mnist", np.zeros((200, 28, 28)), np.arange(200) % 10)
    write_mnist(data_dir, np.zeros((100, 20, 20)), np.arange(100) % 10, split="train")
    code = main(mnist_run(data_dir, tmp_path / "out"))
    assert error_line(code, capsys.readouterr().err) == (
        f"pfedla: error: {data_dir / IMAGES} holds 28x28 images but {data_dir}/train-images-idx3-ubyte.gz "
        "holds 20x20 images: the train and test images must have one size")


def write_torchvision_fmnist(root, train_images, test_images, labels):
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, images in (("train", train_images), ("t10k", test_images)):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(labels[: len(images)]))


@pytest.mark.parametrize(
    ("test_side", "labels", "problem"),
    [(28, np.arange(100) % 13, "labels must be class indices in [0, 10), found 20 outside it (e.g. 10)"),
     (20, np.arange(100) % 10, "train images are 28x28 but test images 20x20: they must have one size")],
    ids=["labels up to 12", "mixed sizes"])
def test_torchvision_sets_with_bad_labels_or_mixed_sizes_are_data_errors(tmp_path, test_side, labels,
                                                                          problem):
    write_torchvision_fmnist(tmp_path, np.zeros((50, 28, 28)), np.zeros((50, test_side, test_side)), labels)
    config = config_from_dict({"dataset": "fmnist", "data_dir": str(tmp_path), "clients": 4})
    with pytest.raises(DataError) as error:
        build_federated_data(config)
    assert str(error.value) == f"fmnist in {tmp_path}: {problem}"


@pytest.mark.parametrize("side", [1, 3])
def test_images_smaller_than_the_cnn_takes_are_refused_before_training(tmp_path, capsys, side):
    data_dir = write_mnist(tmp_path / "mnist", np.ones((200, side, side)), np.arange(200) % 10)
    code = main(mnist_run(data_dir, tmp_path / "out"))
    assert error_line(code, capsys.readouterr().err) == (
        f"pfedla: error: mnist in {data_dir}: model 'cnn' needs images of at least 4x4 pixels, "
        f"got {side}x{side}; use model: mlp")
    assert main(mnist_run(data_dir, tmp_path / "mlp", "--set", "model=mlp")) == 0  # the MLP takes any size


def test_non_square_images_are_refused_for_the_cnn(tmp_path):
    data_dir = write_mnist(tmp_path / "mnist", np.ones((200, 28, 20)), np.arange(200) % 10)
    config = config_from_dict({"dataset": "mnist", "data_dir": str(data_dir), "clients": 4})
    with pytest.raises(DataError, match="model 'cnn' needs square images, got 28x20; use model: mlp"):
        build_federated_data(config)


def test_the_smallest_image_the_cnn_is_said_to_take_trains(tmp_path, capsys):
    pixels = np.arange(200 * 16).reshape(200, 4, 4) % 255
    data_dir = write_mnist(tmp_path / "mnist", pixels, np.arange(200) % 10)
    assert main(mnist_run(data_dir, tmp_path / "out")) == 0
