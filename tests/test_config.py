"""Config loading, overrides and validation errors that name the key and what is allowed."""

import contextlib

import pytest

from pfedla.config import ExperimentConfig, config_from_dict, load_config
from pfedla.errors import ConfigError


def test_defaults_are_valid_and_offline():
    config = load_config()
    assert config == ExperimentConfig()
    assert config.dataset == "digits"
    assert config.algorithms == ["pfedla", "fedavg", "local"]


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("clients: 6\npartition:\n  kind: dirichlet\n  alpha: 0.3\nalgorithms: [pfedla]\n")
    config = load_config(path, ["rounds=3", "partition.alpha=0.1", "algorithms=[fedavg, local]",
                                "data_dir=/x"])
    assert (config.clients, config.rounds) == (6, 3)
    assert config.partition.kind == "dirichlet" and config.partition.alpha == 0.1
    assert config.algorithms == ["fedavg", "local"]
    assert config.data_dir == "/x"


def test_flat_params_cover_nested_keys():
    params = load_config().flat_params()
    assert params["partition.kind"] == "pathological"
    assert params["hn_lr"] == str(ExperimentConfig().hn_lr)


@pytest.mark.parametrize(
    ("raw", "key", "fragment"),
    [
        ({"dataset": "imagenet"}, "dataset", "allowed: digits, mnist"),
        ({"clients": 1}, "clients", "at least 2"),
        ({"participation": 0.0}, "participation", "(0, 1]"),
        ({"participation": 1.5}, "participation", "(0, 1]"),
        ({"partition": {"classes_per_client": 11}}, "partition.classes_per_client", "10 classes"),
        ({"partition": {"kind": "shards"}}, "partition.kind", "iid, dirichlet, pathological"),
        ({"partition": {"alpha": 0}}, "partition.alpha", "> 0"),
        ({"lr": -0.1}, "lr", "> 0"),
        ({"hn_lr": -1}, "hn_lr", ">= 0"),
        ({"rounds": "ten"}, "rounds", "integer"),
        ({"rounds": True}, "rounds", "integer"),
        ({"lr": float("nan")}, "lr", "finite"),
        ({"algorithms": ["pfedla", "scaffold"]}, "algorithms", "pfedla, pfedla_frozen, fedavg, local"),
        ({"algorithms": []}, "algorithms", "at least one"),
        ({"algorithms": ["local", "local"]}, "algorithms", "at most once"),
        ({"device": "tpu"}, "device", "auto, cpu, cuda"),
        ({"model": "resnet"}, "model", "cnn, mlp"),
        ({"heur_k": -1}, "heur_k", ">= 0"),
        ({"dataset": "mnist"}, "data_dir", "needs data_dir"),
        ({"dataset": "synthetic"}, "model", "mlp"),
        ({"clientz": 3}, "clientz", "unknown key"),
        ({"partition": {"alpah": 1}}, "partition.alpah", "unknown key"),
        ({"partition": 3}, "partition", "section"),
        ({"output_dir": ""}, "output_dir", "empty"),
        ({"client_timeout": 0}, "client_timeout", "> 0 seconds"),
        ({"max_update_norm": -1.0}, "max_update_norm", "> 0"),
        ({"max_failed_fraction": 1.5}, "max_failed_fraction", "[0, 1]"),
    ],
)
def test_invalid_values_name_the_key(raw, key, fragment):
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw)
    assert caught.value.key == key
    assert key in str(caught.value) and fragment in str(caught.value)


def test_bad_override_syntax_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["rounds"])
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("rounds: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)


def test_shipped_example_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


# Property-based: whatever a user writes, the answer is a config or a ConfigError, nothing else.
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pfedla.config import PartitionConfig  # noqa: E402

_KEYS = [f.name for f in __import__("dataclasses").fields(ExperimentConfig)]
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
    | st.text(max_size=12) | st.sampled_from(["digits", "iid", "pfedla", "cnn", "cpu", "s3://x/y"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
_CONFIGS = st.dictionaries(
    st.sampled_from(_KEYS + ["partition.kind", "bogus"]) | st.text(max_size=10), _VALUES, max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_CONFIGS)
def test_random_configs_are_accepted_or_rejected_with_a_config_error(raw):
    try:
        config = config_from_dict(raw)
    except ConfigError as error:
        assert str(error).startswith(f"config key '{error.key}': ")
    else:
        assert isinstance(config.partition, PartitionConfig) and config.clients >= 2


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=20), max_size=4))
def test_random_overrides_are_accepted_or_rejected_with_a_config_error(overrides):
    with contextlib.suppress(ConfigError):
        load_config(None, overrides)
