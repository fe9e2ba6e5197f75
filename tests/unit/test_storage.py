"""Local storage and safetensors I/O (S3 is exercised against a real server in integration tests)."""

import pytest
import torch

from cli_errors import error_line, run_cli
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


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "101", "5 retries", "9" * 5000])
def test_a_bad_retry_count_is_a_storage_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("PFEDLA_S3_RETRIES", value)
    with pytest.raises(storage.StorageError) as error:
        storage.s3_client()
    assert str(error.value).startswith("PFEDLA_S3_RETRIES must be a whole number from 0 to 100, got ")
    assert len(str(error.value)) < 200


@pytest.mark.parametrize(("value", "retries"), [("0", 0), (" 7 ", 7), ("100", 100), ("", 5), (None, 5)])
def test_retry_counts_that_are_accepted(monkeypatch, value, retries):
    if value is None:
        monkeypatch.delenv("PFEDLA_S3_RETRIES", raising=False)
    else:
        monkeypatch.setenv("PFEDLA_S3_RETRIES", value)
    assert storage.s3_client().meta.config.retries["total_max_attempts"] == retries + 1  # + the first try


def test_a_bad_retry_count_is_one_error_line_from_the_cli(tmp_path):
    """Before any connection: the endpoint is a loopback port nothing listens on."""
    result = run_cli("run", "--quiet", "--set", "dataset=mnist", "--set", "data_dir=s3://bucket/mnist",
                     "--set", f"output_dir={tmp_path / 'out'}",
                     env={"PFEDLA_S3_RETRIES": "lots", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert error_line(result.returncode, result.stderr) == \
        "pfedla: error: PFEDLA_S3_RETRIES must be a whole number from 0 to 100, got 'lots'"


def test_s3_uri_parsing():
    assert storage.split_s3("s3://bucket/a/b.json") == ("bucket", "a/b.json")
    with pytest.raises(storage.StorageError, match="bucket"):
        storage.split_s3("s3:///key")


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _valid_bytes() -> bytes:
    from safetensors.torch import save

    return save({"models.0": torch.arange(12.0).view(3, 4), "hn.w": torch.ones(5)},
                metadata={"pfedla": '{"algorithm": "pfedla"}'})


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_are_rejected_with_an_artifact_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("rand") / "x.safetensors"
    path.write_bytes(data)
    try:
        storage.load_tensors(path)
    except ArtifactError as error:
        assert "x.safetensors" in str(error)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_tampered_safetensors_load_cleanly_or_fail_with_an_artifact_error(tmp_path_factory, data):
    valid = bytearray(_valid_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(valid) - 1))
        valid[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(valid)))
    path = tmp_path_factory.mktemp("tamper") / "t.safetensors"
    path.write_bytes(bytes(valid[:cut]))
    try:
        tensors, meta = storage.load_tensors(path)
    except ArtifactError:
        return
    assert isinstance(tensors, dict) and isinstance(meta, dict)


@pytest.mark.parametrize("suffix", ["../x", "a/../../x", "/etc/x", "a//b", "./a", "a\\..\\x", ""])
def test_cache_paths_never_leave_their_folder(tmp_path, suffix):
    with pytest.raises(storage.StorageError, match="refusing object key suffix"):
        storage.cache_path(tmp_path / "cache", suffix)


def test_plain_keys_map_below_the_cache_folder(tmp_path):
    assert storage.cache_path(tmp_path, "mnist/t10k-images-idx3-ubyte.gz") == \
        tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"


def test_a_bucket_listing_with_a_traversing_key_stops_the_download_before_any_write(tmp_path, monkeypatch):
    """SeaweedFS refuses keys with ``..`` (InvalidRequest) while AWS S3 stores them, so the listing
    is the one stand-in here: the keys a hostile or careless bucket can return."""
    listing = [{"Key": "data/ok.bin", "Size": 1}, {"Key": "data/../../escape.bin", "Size": 1}]
    monkeypatch.setattr(storage, "_s3_objects", lambda uri, bucket, prefix: listing)
    monkeypatch.setattr(storage, "read_bytes", lambda location: b"x")
    cache = tmp_path / "a" / "cache"
    with pytest.raises(storage.StorageError, match=r"refusing object key suffix '\.\./\.\./escape\.bin'"):
        storage.download_prefix("s3://bucket/data", cache)
    assert not cache.exists() and not list(tmp_path.rglob("escape.bin"))
