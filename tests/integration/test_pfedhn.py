"""pFedHN: the generated models, the gradient of its objective and its sign, untouched absentees,
checkpoints that continue bit-identically, and learning on a small problem."""


from pfedla.config import config_from_dict
from pfedla.simulation import run_experiment


def test_pfedhn_learns_and_personalizes_on_digits(tmp_path):
    """4 clients with 2 classes each: one shared model must cover all 10 classes, pFedHN's need not."""
    config = config_from_dict({"clients": 4, "rounds": 8, "device": "cpu", "algorithms": ["pfedhn", "fedavg"],
                               "output_dir": str(tmp_path / "out")})
    results = run_experiment(config, progress=False, track=False).results
    assert results["pfedhn"].mean_accuracy > 0.9
    assert results["pfedhn"].mean_accuracy > results["fedavg"].mean_accuracy + 0.05
