"""Ditto: FedAvg for a global model w, and per client a personal model v pulled toward w by λ."""

import torch

from pfedla import storage
from pfedla.simulation import run_experiment


def run(tiny_config, tmp_path, lam, algorithms=("ditto",)):
    config = tiny_config(participation=0.75, ditto={"lam": lam}, model="cnn_bn", algorithms=list(algorithms),
                         output_dir=str(tmp_path / f"ditto{lam}"))
    return run_experiment(config, progress=False, track=False).results


def personal_models(tmp_path, lam, name):
    return storage.load_tensors(tmp_path / f"ditto{lam}" / "seed_0" / "models" / f"{name}.safetensors")[0]


def test_with_lambda_zero_personal_models_train_exactly_like_local(tiny_config, tmp_path):
    results = run(tiny_config, tmp_path, 0.0, ("ditto", "local"))
    assert results["ditto"].client_accuracies == results["local"].client_accuracies
    ditto, local = personal_models(tmp_path, 0.0, "ditto"), personal_models(tmp_path, 0.0, "local")
    assert ditto.keys() == local.keys()  # running statistics included
    assert all(torch.equal(ditto[k], local[k]) for k in ditto)
    # the global model still trains and travels: Ditto's bytes are FedAvg's, local's are zero
    assert results["ditto"].history[0]["bytes_up"] > 0 == results["local"].history[0]["bytes_up"]


def test_lambda_pulls_personal_models_toward_the_global_model(tiny_config, tmp_path):
    def spread(lam):
        run(tiny_config, tmp_path, lam)
        models = personal_models(tmp_path, lam, "ditto")
        weights = torch.stack([models[f"client{i}.fc1.weight"] for i in range(4)])
        return float((weights - weights.mean(0)).norm())

    assert spread(5.0) < 0.7 * spread(0.0)  # measured: 0.44 against 0.81
