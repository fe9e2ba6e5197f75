"""FedProx: FedAvg's server with a proximal term in every client's local objective."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from pfedla.algorithms import make_strategy
from pfedla.client import LocalTrainer, ModelState, TrainSettings
from pfedla.config import config_from_dict
from pfedla.models import LayerLayout, build_model, initial_layers
from pfedla.simulation import run_experiment


def test_with_mu_zero_fedprox_is_fedavg_exactly(tiny_config):
    config = tiny_config(participation=0.75, fedprox={"mu": 0.0}, algorithms=["fedavg", "fedprox"])
    results = run_experiment(config, progress=False, track=False).results
    assert results["fedprox"].client_accuracies == results["fedavg"].client_accuracies  # exact
    assert [h["train_loss"] for h in results["fedprox"].history] == \
        [h["train_loss"] for h in results["fedavg"].history]


def test_each_step_adds_mu_times_the_drift_from_the_start_model():
    """Two SGD steps against a hand-written FedProx step: θ ← θ − lr·(∇L(θ) + mu·(θ − θ_start))."""
    model = build_model("mlp", (6,), 3, seed=0)
    layout = LayerLayout.of(model)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    start = initial_layers(model)
    mu, lr = 0.7, 0.3
    settings = TrainSettings(epochs=1, batch_size=4, lr=lr, proximal_mu=mu)
    trained, _ = LocalTrainer(model, layout).train(ModelState(start, {}), x, y, settings,
                                                   torch.Generator().manual_seed(5))

    order = torch.randperm(8, generator=torch.Generator().manual_seed(5))  # the trainer's batch order
    theta = [t.clone() for t in start]
    for batch in (order[:4], order[4:]):
        params = {k: v.requires_grad_() for k, v in layout.unflatten([t.clone() for t in theta]).items()}
        loss = nn.functional.cross_entropy(functional_call(model, params, (x[batch],)), y[batch])
        named_grads = zip(params, torch.autograd.grad(loss, list(params.values())), strict=True)
        grads = layout.flatten(dict(named_grads))
        theta = [t - lr * (g + mu * (t - s)) for t, g, s in zip(theta, grads, start, strict=True)]
    for ours, expected in zip(trained.layers, theta, strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mu", [0.1, 1.0])
def test_the_proximal_term_holds_clients_closer_to_the_global_model(mu):
    model = build_model("mlp", (6,), 3, seed=0)
    layout = LayerLayout.of(model)
    x, y = torch.randn(64, 6, generator=torch.Generator().manual_seed(2)), torch.arange(64) % 3
    start = initial_layers(model)

    def drift(proximal_mu):
        settings = TrainSettings(epochs=5, batch_size=8, lr=0.2, proximal_mu=proximal_mu)
        trainer = LocalTrainer(model, layout)
        trained, _ = trainer.train(ModelState(start, {}), x, y, settings, torch.Generator().manual_seed(3))
        pairs = zip(trained.layers, start, strict=True)
        return float(torch.sqrt(sum(((t - s) ** 2).sum() for t, s in pairs)))

    assert drift(mu) < drift(0.0)


def test_the_server_sends_mu_with_the_global_model_and_aggregates_like_fedavg():
    config = config_from_dict({"clients": 3, "fedprox": {"mu": 0.25}})
    model = nn.Linear(2, 3)
    strategy = make_strategy("fedprox", config, model)
    instructions = strategy.configure_fit(0, [0, 2])
    assert sorted(instructions) == [0, 2]
    assert all(i.proximal_mu == 0.25 and not i.kept_local for i in instructions.values())
    assert make_strategy("fedavg", config, model).configure_fit(0, [0])[0].proximal_mu == 0.0
