"""Local storage and safetensors I/O (S3 is exercised against a real server in integration tests)."""

import pytest
import torch

from pfedla import storage
from pfedla.errors import ArtifactError


def test_tensors_and_metadata_round_trip(tmp_path):
    tensors = {"a": torch.arange(6.0).view(2, 3), "b.c": torch.tensor([1, 2], dtype=torch.int64)}
    storage.save_tensors(tmp_path / "x" / "t.safetensors", tensors, {"round": 3, "name": "pfedla"})
    loaded, meta = storage.load_tensors(tmp_path / "x" / "t.safetensors")
    assert meta == {"round": 3, "name": "pfedla"}
    assert set(loaded) == {"a", "b.c"} and torch.equal(loaded["a"], tensors["a"])
    assert not list((tmp_path / "x").glob("*.partial"))


@pytest.mark.parametrize("damage", ["truncate", "header", "garbage", "empty"])
def test_damaged_files_give_an_artifact_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "t.safetensors"
    storage.save_tensors(path, {"a": torch.ones(100)})
    data = path.read_bytes()
    broken = {"truncate": data[: len(data) // 2], "header": data[:8] + b"X" + data[9:],
              "garbage": b"\x00" * 3, "empty": b""}[damage]
    path.write_bytes(broken)
    with pytest.raises(ArtifactError, match="t.safetensors"):
        storage.load_tensors(path)


def test_missing_file_is_a_storage_error(tmp_path):
    with pytest.raises(storage.StorageError, match="cannot read"):
        storage.load_tensors(tmp_path / "nope.safetensors")


def test_s3_uri_parsing():
    assert storage.split_s3("s3://bucket/a/b.json") == ("bucket", "a/b.json")
    with pytest.raises(storage.StorageError, match="bucket"):
        storage.split_s3("s3:///key")
