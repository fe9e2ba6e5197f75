"""The data plane: checked objects under an experiment prefix, byte ledgers, launcher-safe summaries."""


import pytest
import torch

from pfedla import storage
from pfedla.dataplane import DataPlane


def test_the_data_plane_on_the_real_s3_server(tmp_path, s3_server, monkeypatch):
    """Real SeaweedFS: objects, a copy made by the store itself, and deleting a round's folder."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    plane = DataPlane(f"s3://{s3_server.bucket}/plane-test/{tmp_path.name}")
    ref = plane.put_tensors("rounds/00000/state.safetensors", {"models.0": torch.ones(2, 3)})
    plane.put_bytes("rounds/00000/models/client_0.safetensors", b"m0")
    copied = plane.copy(ref, "checkpoints/round_00000/state.safetensors")
    assert plane.transfers.copied_bytes == ref.size and plane.transfers.read_bytes == 0
    tensors, _ = DataPlane(plane.prefix).get_tensors(copied)
    assert torch.equal(tensors["models.0"], torch.ones(2, 3))
    assert plane.delete_folder("rounds/00000") == 2
    with pytest.raises(storage.StorageError, match="NoSuchKey"):
        plane.get_bytes(ref)
    assert DataPlane(plane.prefix).get_bytes(copied)
