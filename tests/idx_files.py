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
