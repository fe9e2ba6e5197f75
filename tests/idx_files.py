"""MNIST-style IDX files written by tests, and a fingerprint of a federated dataset to compare two."""

import gzip

import numpy as np


def fingerprint(data):
    """Every client's labels and a checksum of its features: equal datasets have equal fingerprints."""
    return [(s.train_y.tolist(), s.test_y.tolist(), float(s.train_x.sum())) for s in data.shards]


def idx_bytes(array):
    """``array`` in the IDX format of the MNIST files (unsigned bytes)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path, array):
    """``array`` as a gzipped IDX file at ``path``."""
    path.write_bytes(gzip.compress(idx_bytes(array)))


def write_mnist(directory, images, labels, split="t10k"):
    """An MNIST folder holding ``split``'s images and labels as IDX files; returns the folder."""
    directory.mkdir(exist_ok=True)
    write_idx(directory / f"{split}-images-idx3-ubyte.gz", images)
    write_idx(directory / f"{split}-labels-idx1-ubyte.gz", labels)
    return directory


def mnist_run(data_dir, out, *overrides):
    """``pfedla run`` arguments for one quick round of Local on the MNIST folder ``data_dir``."""
    return ["run", "--quiet", "--set", "dataset=mnist", "--set", f"data_dir={data_dir}", "--set", "clients=4",
            "--set", "partition.kind=iid", "--set", "rounds=1", "--set", "algorithms=[local]",
            "--set", f"output_dir={out}", *overrides]
