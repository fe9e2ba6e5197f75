"""The data plane: checked objects under an experiment prefix, byte ledgers, launcher-safe summaries."""

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pfedla.config import config_from_dict, experiment_key
from pfedla.dataplane import DataPlane, ObjectRef, finite_summary, ref_at, run_prefix, strict_json
from pfedla.errors import ArtifactError


def test_objects_round_trip_and_every_byte_is_counted(tmp_path):
    plane = DataPlane(str(tmp_path / "prefix"))
    key = "rounds/00001/models/client_3.safetensors"
    ref = plane.put_tensors(key, {"layer.0": torch.arange(4.0)}, {"round": 1})
    assert ref.uri == f"{tmp_path}/prefix/rounds/00001/models/client_3.safetensors"
    assert ref.size == (tmp_path / "prefix" / "rounds/00001/models/client_3.safetensors").stat().st_size
    reader = DataPlane(str(tmp_path / "prefix"))
    tensors, meta = reader.get_tensors(ref)
    assert torch.equal(tensors["layer.0"], torch.arange(4.0)) and meta == {"round": 1}
    assert reader.transfers.read_bytes == ref.size
    assert reader.transfers.objects_read == ["rounds/00001/models/client_3.safetensors"]
    assert plane.transfers.written_bytes == ref.size and reader.transfers.written_bytes == 0
    (tmp_path / "in.json").write_text(json.dumps({"kind": "pfedla/plan", "version": 1, "round": 1}))
    assert reader.read_manifest(tmp_path / "in.json", "pfedla/plan")["round"] == 1
    assert reader.transfers.read_bytes == ref.size + (tmp_path / "in.json").stat().st_size


@pytest.mark.parametrize("damage", ["flip", "append", "truncate"])
def test_an_object_that_differs_from_its_reference_is_refused_naming_it(tmp_path, damage):
    plane = DataPlane(str(tmp_path))
    ref = plane.put_bytes("a/b.bin", b"0123456789")
    damaged = {"flip": b"0123456780", "append": b"0123456789!", "truncate": b"01234"}[damage]
    (tmp_path / "a" / "b.bin").write_bytes(damaged)
    with pytest.raises(ArtifactError, match=f"{tmp_path}/a/b.bin does not match its manifest"):
        plane.get_bytes(ref)


def test_manifests_of_another_kind_or_release_are_refused(tmp_path):
    plane = DataPlane(str(tmp_path))
    for body, message in [({"kind": "pfedla/updates", "version": 1}, "is not a pfedla/plan manifest"),
                          ({"kind": "pfedla/plan", "version": 0}, "written by another pfedla release"),
                          ([1, 2], "found 'list'")]:
        (tmp_path / "m.json").write_text(json.dumps(body))
        with pytest.raises(ArtifactError, match=message):
            plane.read_manifest(tmp_path / "m.json", "pfedla/plan")


def test_manifest_writes_are_strict_json_and_carry_the_ledger_once(tmp_path):
    plane = DataPlane(str(tmp_path))
    plane.put_bytes("x", b"abc")
    plane.write_manifest(tmp_path / "passed-on.json", "pfedla/plan", {"round": 1}, ledger=False)
    plane.write_manifest(tmp_path / "out.json", "pfedla/plan", {"round": 1})
    assert "transfers" not in json.loads((tmp_path / "passed-on.json").read_text())
    assert json.loads((tmp_path / "out.json").read_text())["transfers"]["objects_written"] == ["x"]
    with pytest.raises(ValueError):
        plane.write_manifest(tmp_path / "nan.json", "pfedla/plan", {"loss": math.nan})
    assert not (tmp_path / "nan.json").exists()
    assert strict_json({"a": 1.5}) == b'{\n "a": 1.5\n}'


@given(st.dictionaries(st.text(max_size=5), st.none() | st.booleans() | st.integers() | st.floats() |
                       st.text(max_size=5)))
def test_summaries_hold_only_finite_numbers_strings_and_booleans(values):
    summary = finite_summary(values)
    for key, value in summary.items():
        assert isinstance(value, (str, bool, int, float)), key
        assert not isinstance(value, float) or math.isfinite(value), key
    dropped = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
    assert summary.get("non_finite", "") == ",".join(dropped) or "non_finite" in values


def test_malformed_references_give_errors_naming_where(tmp_path):
    good = DataPlane(str(tmp_path)).put_bytes("k", b"x").to_dict()
    found = ref_at({"clients": {"3": {"model": good}}}, "clients", 3, "model")
    assert found == ObjectRef.from_dict(good, "m")
    with pytest.raises(ArtifactError, match="manifest has no entry clients/4/model"):
        ref_at({"clients": {"3": {"model": good}}}, "clients", 4, "model")
    for bad in ({**good, "size": -1}, {**good, "size": "3"}, {**good, "sha256": "abc"}, {"uri": "x"}, "x"):
        with pytest.raises(ArtifactError, match="state"):
            ObjectRef.from_dict(bad, "state")


def test_the_prefix_is_per_experiment_and_ignores_keys_that_do_not_change_the_numbers():
    base = config_from_dict({"experiment_name": "my exp/1"})
    assert run_prefix(base, "s3://b/") == f"s3://b/runs/my-exp-1/{experiment_key(base)}"
    same = config_from_dict({"experiment_name": "my exp/1", "rounds": 400, "device": "cpu",
                             "pipeline": {"rounds_per_run": 3, "clients_per_pod": 4, "start_round": 5,
                                          "resume_from": "s3://b/x", "data_root": "s3://b"}})
    assert experiment_key(same) == experiment_key(base)
    for changed in ({"seed": 1}, {"lr": 0.1}, {"clients": 7}, {"pipeline": {"algorithm": "fedavg"}},
                    {"max_failed_fraction": 0.2}):
        assert experiment_key(config_from_dict(changed)) != experiment_key(base), changed


