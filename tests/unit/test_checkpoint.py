"""Checkpoint store: atomic writes, keep-last-K, fallback past damaged checkpoints."""

import logging

import pytest
import torch

from pfedla import storage
from pfedla.checkpoint import CheckpointStore

RUN = "0123456789abcdef-00000001"
OTHER_RUN = "0123456789abcdef-00000002"


def state(value: float) -> dict[str, torch.Tensor]:
    return {"models.0": torch.full((3, 4), value), "hn.w": torch.arange(5.0) * value}


def meta(rounds: int) -> dict:
    """What the simulation stores beside the tensors."""
    return {"history": [{"round": float(r)} for r in range(rounds)], "seconds": 1.5, "mlflow_run_id": None}


def test_save_keeps_the_last_k_and_writes_a_pointer(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", keep=2, run=RUN)
    for rounds in (1, 2, 3):
        store.save("pfedla", rounds, state(rounds), meta(rounds))
    folder = tmp_path / "ckpt" / RUN / "pfedla"
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["LATEST", "round_00002.safetensors", "round_00003.safetensors"]
    assert (folder / "LATEST").read_text() == "round_00003.safetensors"
    latest = store.latest("pfedla")
    assert latest.rounds_done == 3 and latest.meta["history"] == meta(3)["history"]
    assert latest.meta["run"] == RUN
    assert torch.equal(latest.tensors["hn.w"], state(3)["hn.w"])
    assert store.latest("fedavg") is None


def test_corrupt_newest_falls_back_to_the_previous_good_one(tmp_path, caplog):
    store = CheckpointStore(tmp_path, keep=3, run=RUN)
    for rounds in (1, 2):
        store.save("local", rounds, state(rounds), meta(rounds))
    newest = tmp_path / RUN / "local" / "round_00002.safetensors"
    newest.write_bytes(newest.read_bytes()[:-7])  # a torn write
    (tmp_path / RUN / "local" / "round_00003.safetensors.partial").write_bytes(b"half")
    with caplog.at_level(logging.WARNING):
        latest = store.latest("local")
    assert latest.rounds_done == 1
    assert "round_00002.safetensors is unusable" in caplog.text and "falling back" in caplog.text


def test_runs_sharing_a_location_never_see_prune_or_clear_each_others_checkpoints(tmp_path, caplog):
    """Two runs with one checkpoint_dir: on the old layout a fresh run cleared the other's
    checkpoints and a resume continued from whichever run had written last."""
    mine = CheckpointStore(tmp_path, keep=1, run=RUN)
    theirs = CheckpointStore(tmp_path, keep=1, run=OTHER_RUN)
    mine.save("pfedla", 2, state(2), meta(2))
    for rounds in (1, 2, 3):
        theirs.save("pfedla", rounds, state(10 + rounds), meta(rounds))
    assert mine.latest("pfedla").rounds_done == 2
    assert torch.equal(mine.latest("pfedla").tensors["hn.w"], state(2)["hn.w"])
    # a checkpoint copied into my folder from another run is refused by its metadata
    foreign = tmp_path / OTHER_RUN / "pfedla" / "round_00003.safetensors"
    (tmp_path / RUN / "pfedla" / "round_00009.safetensors").write_bytes(foreign.read_bytes())
    with caplog.at_level(logging.WARNING):
        assert mine.latest("pfedla").rounds_done == 2
    assert f"is not this run's (written by run {OTHER_RUN})" in caplog.text
    mine.clear()
    assert mine.latest("pfedla") is None and not (tmp_path / RUN).exists()
    assert theirs.latest("pfedla").rounds_done == 3


@pytest.mark.parametrize("damage", [
    {"rounds_done": "3"}, {"history": "x"}, {"history": [1, 2, 3]}, {"history": [{}]},
    {"seconds": None}, {"mlflow_run_id": 7}, {"algorithm": "local"},
])
def test_checkpoints_with_damaged_metadata_are_skipped_not_trusted(tmp_path, damage, caplog):
    store = CheckpointStore(tmp_path, keep=3, run=RUN)
    store.save("pfedla", 2, state(2), meta(2))
    tensors = state(3)
    storage.save_tensors(tmp_path / RUN / "pfedla" / "round_00003.safetensors", tensors,
                         {**meta(3), "algorithm": "pfedla", "rounds_done": 3, "run": RUN, **damage})
    with caplog.at_level(logging.WARNING):
        assert store.latest("pfedla").rounds_done == 2
    assert "round_00003.safetensors is not this run's" in caplog.text


def test_s3_outage_saves_locally_and_says_so(tmp_path, monkeypatch):
    """A refused loopback port stands in for an object store that is down."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("PFEDLA_S3_RETRIES", "1")
    store = CheckpointStore("s3://bucket/ckpt", keep=2, run=RUN, fallback=tmp_path / "fallback")
    with pytest.raises(storage.StorageError) as caught:
        store.save("pfedla", 4, state(4), meta(4))
    message = str(caught.value)
    assert "checkpoint after round 4 could not be stored" in message
    assert "object store unreachable" in message and str(tmp_path / "fallback") in message
    local = CheckpointStore(tmp_path / "fallback", keep=2, run=RUN)
    assert local.latest("pfedla").rounds_done == 4




@pytest.mark.parametrize(("value", "problem"), [
    (float("nan"), "holds NaN or Inf"), (float("inf"), "holds NaN or Inf"),
    (1e30, "holds values beyond 1e+18 in magnitude"),
])
def test_a_checkpoint_holding_a_tensor_no_run_can_continue_from_is_skipped_naming_it(tmp_path, value, problem,
                                                                                        caplog):
    """Issue 21, case 8: on 42ac5ca only names, shapes and dtypes were checked."""
    store = CheckpointStore(tmp_path, keep=3, run=RUN)
    for rounds in (1, 2):
        store.save("pfedla", rounds, state(rounds), meta(rounds))
    tensors = {**state(3), "client.1.personal.0": torch.tensor([0.5, value])}
    store.save("pfedla", 3, tensors, meta(3))
    with caplog.at_level(logging.WARNING):
        assert store.latest("pfedla").rounds_done == 2
    assert f"round_00003.safetensors is unusable (tensor 'client.1.personal.0' {problem})" in caplog.text
