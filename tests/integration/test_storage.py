"""Local storage and safetensors I/O (S3 is exercised against a real server in integration tests)."""

import pytest
import torch

from cli_errors import error_line, run_cli
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


def test_a_bad_retry_count_is_one_error_line_from_the_cli(tmp_path):
    """Before any connection: the endpoint is a loopback port nothing listens on."""
    result = run_cli("run", "--quiet", "--set", "dataset=mnist", "--set", "data_dir=s3://bucket/mnist",
                     "--set", f"output_dir={tmp_path / 'out'}",
                     env={"PFEDLA_S3_RETRIES": "lots", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert error_line(result.returncode, result.stderr) == \
        "pfedla: error: PFEDLA_S3_RETRIES must be a whole number from 0 to 100, got 'lots'"
