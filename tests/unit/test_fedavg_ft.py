"""fedavg_ft: FedAvg whose clients fine-tune the global model before they are evaluated."""

import torch

from pfedla import storage
from pfedla.simulation import run_experiment


def config(tiny_config, tmp_path, epochs):
    return tiny_config(participation=0.75, fedavg_ft={"finetune_epochs": epochs},
                       algorithms=["fedavg", "fedavg_ft"], output_dir=str(tmp_path / f"ft{epochs}"))


def test_with_zero_finetune_epochs_fedavg_ft_is_fedavg_exactly(tiny_config, tmp_path):
    results = run_experiment(config(tiny_config, tmp_path, 0), progress=False, track=False).results
    assert results["fedavg_ft"].client_accuracies == results["fedavg"].client_accuracies
    assert [h["accuracy_mean"] for h in results["fedavg_ft"].history] == \
        [h["accuracy_mean"] for h in results["fedavg"].history]


def test_fine_tuning_personalizes_the_evaluated_models_but_never_the_server_model(tiny_config, tmp_path):
    results = run_experiment(config(tiny_config, tmp_path, 2), progress=False, track=False).results
    # digits' pathological 2-class split: a model tuned to its client's classes beats the global one
    assert results["fedavg_ft"].client_mean_accuracy > results["fedavg"].client_mean_accuracy + 0.1
    out = tmp_path / "ft2" / "seed_0"
    server = {name: storage.load_tensors(out / "checkpoints" / f"{name}.safetensors")[0]
              for name in ("fedavg", "fedavg_ft")}
    assert server["fedavg"].keys() == server["fedavg_ft"].keys()
    assert all(torch.equal(server["fedavg"][k], server["fedavg_ft"][k]) for k in server["fedavg"])
    models, _ = storage.load_tensors(out / "models" / "fedavg_ft.safetensors")
    assert not torch.equal(models["client0.fc2.weight"], models["client1.fc2.weight"])
