"""The algorithm registry: names, settings sections, model and dataset facts, and adding an algorithm."""

import subprocess
import sys

import pytest

from pfedla import registry
from pfedla.algorithms import make_client_rule, make_strategy
from pfedla.config import config_from_dict, load_config
from pfedla.errors import ConfigError
from pfedla.models import build_model
from pfedla.simulation import run_experiment
from toy_algorithm import ToySettings


@pytest.fixture
def toy():
    """The toy algorithm registered for one test: one module (tests/toy_algorithm.py) and this line."""
    spec = registry.register(registry.AlgorithmSpec("toy", "toy_algorithm:build", ToySettings()))
    yield spec
    registry.unregister("toy")


def test_the_config_and_registry_import_no_torch():
    code = ("import sys; from pfedla.config import load_config; load_config(None, ['pfedla.hn_lr=1']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_an_algorithm_is_one_module_plus_its_registration(toy, tmp_path):
    config = config_from_dict({"clients": 3, "rounds": 2, "device": "cpu", "algorithms": ["toy", "fedavg"],
                               "toy": {"step": 1.0}, "output_dir": str(tmp_path / "out"),
                               "partition": {"kind": "iid"}})
    assert config.settings_of("toy") == ToySettings(1.0)
    runs = run_experiment(config, progress=False, track=False).results
    assert runs["toy"].history[-1]["toy_step"] == 1.0  # the toy strategy, not a default, aggregated
    frozen = config_from_dict({**config.to_dict(), "toy": {"step": 0.0}, "output_dir": str(tmp_path / "o2")})
    still = run_experiment(frozen, progress=False, track=False).results["toy"]
    assert still.client_accuracies != runs["toy"].client_accuracies
    with pytest.raises(ConfigError, match="config key 'toy.step': must be at most 1, got 2"):
        load_config(None, ["toy.step=2"])


def test_an_unknown_algorithm_is_an_error_never_a_default():
    model = build_model("mlp", (4,), 3, seed=0)
    config = load_config()
    for make in (make_strategy, make_client_rule):
        with pytest.raises(ConfigError, match="unknown algorithm 'pfedlaa'; known: pfedla, pfedla_frozen"):
            make("pfedlaa", config, model)
    with pytest.raises(ConfigError, match="config key 'algorithms': got 'pfedlaa'; allowed: pfedla,"):
        load_config(None, ["algorithms=[pfedlaa]"])


def test_a_taken_name_cannot_be_registered_twice(toy):
    with pytest.raises(ValueError, match="already taken"):
        registry.register(registry.AlgorithmSpec("toy", "toy_algorithm:build"))
    with pytest.raises(ValueError, match="lower-case identifier"):
        registry.register(registry.AlgorithmSpec("Bad-Name", "toy_algorithm:build"))


def test_an_algorithm_named_like_a_config_key_is_refused(tmp_path):
    registry.register(registry.AlgorithmSpec("rounds", "toy_algorithm:build", ToySettings()))
    try:
        with pytest.raises(ValueError, match=r"algorithms \['rounds'\] have the names of config keys"):
            load_config()
    finally:
        registry.unregister("rounds")


@pytest.mark.parametrize("name", registry.algorithm_names())
def test_every_registered_algorithm_builds_under_its_own_name(name):
    config = load_config(None, ["model=cnn_bn"])
    model = build_model("cnn_bn", (1, 8, 8), 10, seed=0)
    strategy = make_strategy(name, config, model)
    assert strategy.name == name
    assert isinstance(strategy.state_dict(), dict)
    if registry.algorithm(name).default_client:
        assert type(make_client_rule(name, config, model)) is type(strategy.client_rule)


def test_the_config_checks_datasets_against_the_registry():
    emnist = ["dataset=emnist", "data_dir=/d", "partition.classes_per_client=62"]
    assert load_config(None, emnist).partition.classes_per_client == 62
    with pytest.raises(ConfigError, match="between 1 and the dataset's 62 classes, got 63"):
        load_config(None, [*emnist[:2], "partition.classes_per_client=63"])
    offline = {name for name, spec in registry.DATASETS.items() if not spec.needs_data_dir}
    assert offline == {"digits", "synthetic"}
    with pytest.raises(ConfigError, match="needs data_dir"):
        load_config(None, ["dataset=cifar100"])
