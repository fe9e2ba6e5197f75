"""Config loading, overrides and validation errors that name the key and what is allowed."""

import contextlib
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from cli_errors import error_line
from pfedla.cli import main
from pfedla.config import (
    MAXIMA,
    ExperimentConfig,
    config_from_dict,
    experiment_key,
    load_config,
    run_seeds,
    seed_config,
    single_seed,
)
from pfedla.errors import MESSAGE_CHARS, ConfigError


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
    assert params["pfedla.hn_lr"] == str(ExperimentConfig().settings_of("pfedla").hn_lr)


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
        ({"pfedla": {"hn_lr": -1}}, "pfedla.hn_lr", ">= 0"),
        ({"pfedhn": {"lr": 0}}, "pfedhn.lr", "> 0"),
        ({"rounds": "ten"}, "rounds", "integer"),
        ({"rounds": True}, "rounds", "integer"),
        ({"lr": float("nan")}, "lr", "finite"),
        ({"algorithms": ["pfedla", "scaffold"]}, "algorithms",
         "pfedla, pfedla_paper, pfedla_frozen, fedavg, fedavg_ft, fedprox, fedper, fedrep, fedbn, ditto, "
         "pfedhn, local"),
        ({"pfedla": {"heads": "softmax"}}, "pfedla.heads", "softplus, relu"),
        ({"pfedla_paper": {"step": "adam"}}, "pfedla_paper.step", "scaled, annealed, plain"),
        ({"pfedla_frozen": {"init": "zeros"}}, "pfedla_frozen.init", "near_uniform, paper"),
        ({"pfedla": {"hidden_layers": 0}}, "pfedla.hidden_layers", ">= 1"),
        ({"last_batch": "keep"}, "last_batch", "nominal, mean, drop"),
        ({"algorithms": []}, "algorithms", "at least one"),
        ({"algorithms": ["local", "local"]}, "algorithms", "at most once"),
        ({"device": "tpu"}, "device", "auto, cpu, cuda"),
        ({"model": "resnet"}, "model", "cnn, cnn_bn, mlp, mlp_bn"),
        ({"pfedla": {"heur_k": -1}}, "pfedla.heur_k", ">= 0"),
        ({"pfedla_frozen": {"heur_k": 4}}, "pfedla_frozen.heur_k", "4 layers: keep at most 3 local, got 4"),
        ({"fedprox": {"mu": -0.1}}, "fedprox.mu", "must be >= 0"),
        ({"fedavg_ft": {"finetune_epochs": -1}}, "fedavg_ft.finetune_epochs", "must be >= 0"),
        ({"fedrep": {"head_epochs": -1}}, "fedrep.head_epochs", "must be >= 0"),
        ({"ditto": {"lam": -0.5}}, "ditto.lam", "must be >= 0"),
        ({"fedper": {"personal_layers": 4}}, "fedper.personal_layers", "has 4 layers: keep between 1 and 3"),
        ({"fedrep": {"personal_layers": 0}, "model": "mlp"}, "fedrep.personal_layers",
         "keep between 1 and 2"),
        ({"fedprox": 3}, "fedprox", "expected a section"),
        ({"fedprox": {"lam": 1}}, "fedprox.lam", "unknown key; known keys here: mu"),
        ({"algorithms": ["fedbn"]}, "model", "fedbn keeps normalization layers local: use model: cnn_bn or"),
        ({"pipeline": {"algorithm": "fedbn"}}, "model", "use model: cnn_bn"),
        ({"fedprox": {"mu": float("nan")}}, "fedprox.mu", "expected a finite number"),
        ({"dataset": "mnist"}, "data_dir", "needs data_dir"),
        ({"dataset": "synthetic"}, "model", "mlp"),
        ({"clientz": 3}, "clientz", "unknown key"),
        ({"partition": {"alpah": 1}}, "partition.alpah", "unknown key"),
        ({"partition": 3}, "partition", "section"),
        ({"output_dir": ""}, "output_dir", "empty"),
        ({"client_timeout": 0}, "client_timeout", "> 0 seconds"),
        ({"max_update_norm": -1.0}, "max_update_norm", "> 0"),
        ({"max_failed_fraction": 1.5}, "max_failed_fraction", "[0, 1]"),
        ({"experiment_name": "e" * 501}, "experiment_name", "is 501 characters; MLflow allows at most 500"),
        ({"experiment_name": "a\nb"}, "experiment_name", "must not contain control characters, found '\\n'"),
        ({"experiment_name": "a\x00b"}, "experiment_name", "control characters, found '\\x00'"),
        ({"pfedla": {"hidden_dim": 1_000_000}}, "pfedla.hidden_dim", "must be at most 4096, got 1000000"),
        ({"pfedhn": {"embedding_dim": 4097}}, "pfedhn.embedding_dim", "must be at most 4096, got 4097"),
        ({"clients": 10_001}, "clients", "must be at most 10000"),
        ({"rounds": 10**12}, "rounds", "must be at most 1000000"),
        ({"local_epochs": 10**6}, "local_epochs", "must be at most 10000"),
        ({"batch_size": 10**11}, "batch_size", "must be at most 1000000"),
        ({"synthetic": {"dimension": 10**6}}, "synthetic.dimension", "must be at most 100000"),
        ({"synthetic": {"num_classes": 1001}}, "synthetic.num_classes", "must be at most 1000"),
        ({"synthetic": {"samples_per_client": 10**7}}, "synthetic.samples_per_client", "at most 1000000"),
        ({"pipeline": {"rounds_per_run": 1001}}, "pipeline.rounds_per_run", "must be at most 1000"),
        *[({"pipeline": {key: value}}, f"pipeline.{key}", f"must be at most {maximum}, got {value}")
          for key, maximum in [("parallelism", 10_000), ("client_retries", 100), ("gpus_per_client", 64),
                               ("client_pod_timeout", 2**31 - 1), ("segment_timeout", 2**31 - 1)]
          for value in (2**31, 10**20)],
        ({"seeds": []}, "seeds", "list at least one seed"),
        ({"seeds": 3}, "seeds", "expected a list of integers, got 3"),
        ({"seeds": [0, "1"]}, "seeds", "expected a list of integers"),
        ({"seeds": [0, True]}, "seeds", "expected a list of integers"),
        ({"seeds": [1, 2, 1]}, "seeds", "each seed at most once"),
        ({"seeds": [0, -1]}, "seeds", "each seed must be in [0, 4294967295]"),
        ({"seeds": [2**32]}, "seeds", "each seed must be in [0, 4294967295]"),
        ({"seeds": list(range(101))}, "seeds", "at most 100 seeds, got 101"),
    ],
)
def test_invalid_values_name_the_key(raw, key, fragment):
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw)
    assert caught.value.key == key
    assert key in str(caught.value) and fragment in str(caught.value)


def key(**raw) -> str:
    return experiment_key(config_from_dict(raw))


def test_seeds_decide_which_experiments_run_and_their_keys():
    assert run_seeds(config_from_dict({"seed": 4})) == [4]
    several = config_from_dict({"seed": 9, "seeds": [2, 0, 1]})
    assert run_seeds(several) == [2, 0, 1]  # `seed` is not used
    assert config_from_dict({"seeds": list(range(100))}).seeds == list(range(100))
    # one entry is the same experiment as `seed`; several are one of their own, whatever `seed` and order
    assert key(seeds=[3]) == key(seed=3)
    assert experiment_key(several) == key(seeds=[0, 1, 2])
    assert experiment_key(several) not in {key(seed=s) for s in (0, 1, 2, 9)}
    assert key(seed=0) != key(seed=1)
    part = seed_config(several, 1)
    assert (part.seed, part.seeds) == (1, None)
    assert experiment_key(part) == key(seed=1)
    assert single_seed(config_from_dict({"seed": 5, "seeds": [3]})).seed == 3
    with pytest.raises(ConfigError, match="config key 'seeds': the pipeline runs one seed, got 3"):
        single_seed(several)


def test_every_upper_bound_itself_is_accepted():
    raw: dict = {}
    for key, maximum in MAXIMA.items():
        section, _, leaf = key.rpartition(".")
        (raw.setdefault(section, {}) if section else raw)[leaf] = maximum
    widest = {"embedding_dim": 4096, "hidden_dim": 4096}
    config = config_from_dict({**raw, "experiment_name": "é" * 500, "dataset": "synthetic", "model": "mlp",
                               "pfedla": widest, "pfedhn": widest, "fedrep": {"head_epochs": 10_000},
                               "fedavg_ft": {"finetune_epochs": 10_000}})
    assert (config.settings_of("pfedla").hidden_dim, config.pipeline.rounds_per_run) == (4096, 1000)


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


SHIPPED = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: str(path.relative_to(path.parents[1])))
def test_every_shipped_config_loads_and_validates(path):
    """configs/*.yaml, configs/paper/ and configs/mnist-comparison.yaml included."""
    load_config(path)


def test_the_shipped_configs_include_the_paper_settings_and_the_mnist_comparison():
    names = {str(path.relative_to(path.parents[1])) for path in SHIPPED}
    assert "configs/mnist-comparison.yaml" in names
    paper = {load_config(path).dataset for path in SHIPPED if path.parent.name == "paper"}
    assert paper == {"emnist", "fmnist", "cifar10", "cifar100"}
    kinds = {load_config(path).partition.kind for path in SHIPPED if path.parent.name == "paper"}
    assert kinds == {"pathological", "dirichlet"}


# Property-based: whatever a user writes, the answer is a config or a ConfigError, nothing else.
from hypothesis import HealthCheck  # noqa: E402

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


# -- bounded inputs and messages ----------------------------------------------------------------------------

def alias_bomb(levels: int, width: int = 9) -> str:
    """YAML whose value under ``algorithms`` expands to width**levels items through aliases."""
    lines = ["algorithms:", f"  - &l0 [{', '.join(['x'] * width)}]"]
    for level in range(1, levels):
        lines.append(f"  - &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [6, 9])
def test_an_alias_bomb_gives_a_short_error_quickly(tmp_path, levels):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(levels))
    assert path.stat().st_size < 600
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="config key 'algorithms': expected a list of names") as error:
        load_config(path)
    assert len(str(error.value)) < 500 and time.perf_counter() - started < 5


def test_oversized_config_files_and_overrides_are_refused_before_parsing(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("algorithms: [" + ", ".join(["pfedla"] * 200_000) + "]\n")
    with pytest.raises(ConfigError, match=r"is \d+ bytes; a config file may hold at most 1048576 bytes"):
        load_config(path)
    with pytest.raises(ConfigError, match="an override may hold at most 10000"):
        load_config(None, ["output_dir=" + "x" * 20_000])


def test_values_yaml_cannot_hold_give_config_errors(tmp_path):
    path = tmp_path / "digits.yaml"
    path.write_text("rounds: 1" + "0" * 5000 + "\n")  # past Python's int-from-string limit
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path)
    path.write_text("1: 2\nrounds: 3\n")  # a number as a key
    with pytest.raises(ConfigError, match="config key '1': unknown key"):
        load_config(path)
    with pytest.raises(ConfigError, match="config key 'rounds'"):
        load_config(None, ["rounds=1" + "0" * 5000])


_SCALARS = st.one_of(st.integers(-10, 10), st.floats(allow_nan=False), st.text(max_size=5), st.booleans(),
                     st.none())


@settings(max_examples=80, deadline=None)
@given(key=st.sampled_from(["algorithms", "rounds", "lr", "partition", "pipeline", "dataset", "unknown_key"]),
       depth=st.integers(1, 7), width=st.integers(1, 8), leaf=_SCALARS)
def test_random_aliased_configs_load_or_fail_with_a_short_config_error(tmp_path_factory, key, depth, width,
                                                                       leaf):
    lines = [f"{key}:", f"  - &l0 {yaml.safe_dump(leaf).splitlines()[0]}"]
    for level in range(1, depth):
        lines.append(f"  - &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    path = tmp_path_factory.mktemp("aliases") / "c.yaml"
    path.write_text("\n".join(lines) + "\n")
    try:
        load_config(path)
    except ConfigError as error:
        assert len(str(error)) <= MESSAGE_CHARS + 40


@pytest.mark.parametrize(("flat", "moved_to"), [
    ("hn_lr", "pfedla.hn_lr"), ("pfedhn_lr", "pfedhn.lr"), ("mu", "fedprox.mu"),
    ("ditto_lambda", "ditto.lam"),
    ("personal_layers", "fedper.personal_layers or fedrep.personal_layers"),
    ("heur_k", "pfedla.heur_k or pfedla_frozen.heur_k"), ("finetune_epochs", "fedavg_ft.finetune_epochs"),
    ("head_epochs", "fedrep.head_epochs"),
    ("embedding_dim", "pfedla.embedding_dim, pfedla_frozen.embedding_dim or pfedhn.embedding_dim"),
    ("hidden_dim", "pfedla.hidden_dim, pfedla_frozen.hidden_dim or pfedhn.hidden_dim"),
])
def test_a_flat_key_from_before_the_sections_is_refused_with_where_it_went(flat, moved_to):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [f"{flat}=1"])
    assert str(caught.value) == (f"config key '{flat}': each algorithm has its own section now: "
                                 f"set {moved_to} (docs/configuration.md)")


def test_each_algorithm_reads_its_own_section_and_sections_round_trip():
    config = load_config(None, ["pfedla.embedding_dim=8", "pfedhn.embedding_dim=16",
                                "fedrep.personal_layers=2"])
    assert config.settings_of("pfedla").embedding_dim == 8
    assert config.settings_of("pfedla_frozen").embedding_dim == 32  # a key two algorithms use is each one's
    assert config.settings_of("pfedhn").embedding_dim == 16
    heads = (config.settings_of("fedrep").personal_layers, config.settings_of("fedper").personal_layers)
    assert heads == (2, 1)
    assert config.settings_of("fedavg") is None  # no settings, no section
    assert config_from_dict(config.to_dict()) == config
    assert config.flat_params()["pfedhn.embedding_dim"] == "16"
    assert experiment_key(config) != experiment_key(load_config())


@pytest.mark.parametrize(("overrides", "key", "fragment"), [
    (["seed=4294967296"], "seed", "must be in [0, 4294967295], got 4294967296"),
    (["seed=-1"], "seed", "must be in [0, 4294967295], got -1"),
    (["pfedla.heur_k=100"], "pfedla.heur_k", "the model has 4 layers: keep at most 3 local, got 100"),
    (["pfedla.heur_k=4"], "pfedla.heur_k", "the model has 4 layers: keep at most 3 local, got 4"),
    (["pfedla_frozen.heur_k=3", "model=mlp"], "pfedla_frozen.heur_k",
     "the model has 3 layers: keep at most 2 local, got 3"),
])
def test_a_seed_out_of_range_or_heur_k_past_the_models_layers_is_refused(overrides, key, fragment, tmp_path,
                                                                         capsys):
    """Issue 21, cases 10 and 11: on main seed=4294967296 ran seed 0's numbers, seed=-1 made a folder
    seed_-1/, and heur_k=100 on a 4-layer model was clamped to 4, which is local training."""
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    assert caught.value.key == key and fragment in str(caught.value)
    out = tmp_path / "out"
    code = main(["run", "--quiet", *(item for override in overrides for item in ("--set", override)),
                 "--set", f"output_dir={out}"])
    line = error_line(code, capsys.readouterr().err)
    assert f"config key '{key}'" in line and not out.exists()


def test_the_largest_seed_and_heur_k_are_accepted():
    assert config_from_dict({"seed": 2**32 - 1, "pfedla": {"heur_k": 3}}).settings_of("pfedla").heur_k == 3
    assert config_from_dict({"model": "cnn_bn", "pfedla": {"heur_k": 5}}).settings_of("pfedla").heur_k == 5
