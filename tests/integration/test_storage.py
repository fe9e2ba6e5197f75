"""Local storage and safetensors I/O (S3 is exercised against a real server in integration tests)."""

import pytest
import torch

from pfedla import storage


def test_s3_with_a_wrong_key_is_a_clear_error_and_changes_nothing(s3_server, monkeypatch, tmp_path):
    """Real SeaweedFS with authentication on: pfedla's storage API with a good, then a wrong key."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    uri = f"s3://{s3_server.bucket}/storage-test/{tmp_path.name}/t.safetensors"
    storage.save_tensors(uri, {"a": torch.ones(3)}, {"round": 1})
    wrong = s3_server.secret_key + "-wrong"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    monkeypatch.setenv("PFEDLA_S3_RETRIES", "1")
    hint = r"\(check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY\)"
    with pytest.raises(storage.StorageError, match=f"cannot read {uri}: .*{hint}") as refused_read:
        storage.load_tensors(uri)
    with pytest.raises(storage.StorageError, match=f"cannot write {uri}: .*{hint}") as refused_write:
        storage.save_tensors(uri, {"a": torch.zeros(3)}, {"round": 2})
    assert wrong not in str(refused_read.value) + str(refused_write.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    tensors, meta = storage.load_tensors(uri)
    assert torch.equal(tensors["a"], torch.ones(3)) and meta == {"round": 1}


def test_objects_past_the_multipart_threshold_round_trip_and_copy_on_the_real_s3_server(
        s3_server, monkeypatch, tmp_path):
    """Real SeaweedFS: a 65 MiB object goes up in parts, comes back whole and is copied by the store."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    data = bytes(range(256)) * (storage.MULTIPART_BYTES // 256 + 4096)
    uri = f"s3://{s3_server.bucket}/storage-test/{tmp_path.name}/big.bin"
    storage.write_bytes(uri, data)
    head = s3_server.client().head_object(Bucket=s3_server.bucket, Key=uri.split("/", 3)[3])
    assert head["ContentLength"] == len(data) and "-" in head["ETag"]  # a multipart upload's ETag
    assert storage.read_bytes(uri) == data
    storage.copy(uri, uri + ".copy")
    assert storage.read_bytes(uri + ".copy") == data
    assert storage.delete_prefix(uri.rsplit("/", 1)[0]) == 2
