"""The algorithm registry: names, settings sections, model and dataset facts, and adding an algorithm."""


import pytest

from pfedla.config import config_from_dict, load_config
from pfedla.errors import ConfigError
from pfedla.simulation import run_experiment
from toy_algorithm import ToySettings


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
