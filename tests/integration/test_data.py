"""Sources and partitioners: seeded, computed once, disjoint train/test, the promised classes."""


import numpy as np
import pytest

from idx_files import fingerprint, write_idx
from pfedla.config import config_from_dict
from pfedla.data import build_federated_data
from pfedla.storage import StorageError


def test_mnist_from_an_s3_prefix_is_cached_and_equals_the_local_directory(tmp_path, s3_server, monkeypatch):
    """data_dir: s3://... on the real SeaweedFS: downloaded once into output_dir/data-cache."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    rng = np.random.default_rng(0)
    local = tmp_path / "local"
    local.mkdir()
    write_idx(local / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (200, 28, 28)))
    write_idx(local / "t10k-labels-idx1-ubyte.gz", np.arange(200) % 10)
    prefix = f"datasets/{tmp_path.name}/mnist"
    s3 = s3_server.client()
    for file in local.iterdir():
        s3.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/{file.name}", Body=file.read_bytes())
    base = {"dataset": "mnist", "clients": 4, "partition": {"kind": "iid"},
            "output_dir": str(tmp_path / "out")}
    s3_config = config_from_dict({**base, "data_dir": f"s3://{s3_server.bucket}/{prefix}"})
    from_s3 = build_federated_data(s3_config)
    from_dir = build_federated_data(config_from_dict({**base, "data_dir": str(local)}))
    assert fingerprint(from_s3) == fingerprint(from_dir)
    cached = tmp_path / "out" / "data-cache" / "t10k-labels-idx1-ubyte.gz"
    assert cached.read_bytes() == (local / "t10k-labels-idx1-ubyte.gz").read_bytes()
    written = cached.stat().st_mtime_ns
    assert fingerprint(build_federated_data(s3_config)) == fingerprint(from_dir)
    assert cached.stat().st_mtime_ns == written  # unchanged objects are not fetched again
    with pytest.raises(StorageError, match=f"no objects under s3://{s3_server.bucket}/datasets/none"):
        build_federated_data(config_from_dict({**base, "data_dir": f"s3://{s3_server.bucket}/datasets/none"}))
