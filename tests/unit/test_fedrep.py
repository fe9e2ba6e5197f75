"""FedRep: the private head is trained first with the body fixed, then the shared body."""

import torch

from pfedla.algorithms import make_strategy
from pfedla.client import LocalTrainer
from pfedla.config import config_from_dict
from pfedla.data import build_federated_data
from pfedla.rounds import fit_client
from pfedla.simulation import Simulation


def test_head_epochs_on_the_head_then_local_epochs_on_the_body_from_the_new_head(monkeypatch):
    config = config_from_dict({"clients": 3, "device": "cpu", "local_epochs": 2,
                               "fedrep": {"head_epochs": 3, "personal_layers": 1}})
    simulation = Simulation(config, build_federated_data(config), torch.device("cpu"), tracker=None,
                            progress=False)
    strategy = make_strategy("fedrep", config, simulation.model)
    calls, real_train = [], LocalTrainer.train

    def spy(self, start, x, y, settings, generator, trainable=None, anchor=None):
        trained, loss = real_train(self, start, x, y, settings, generator, trainable, anchor)
        calls.append((start, trainable, settings.epochs, trained))
        return trained, loss

    monkeypatch.setattr(LocalTrainer, "train", spy)
    state = strategy.client_rule.initial_state(simulation.init_model)
    update, new_state = fit_client(strategy.client_rule, simulation.trainer,
                                   strategy.configure_fit(0, [0])[0], state, simulation.shards[0].train,
                                   config, 0, 0)
    (head_start, head_only, head_epochs, with_head), (body_start, body_only, epochs, trained) = calls
    assert (head_only, head_epochs, body_only, epochs) == ({3}, 3, {0, 1, 2}, 2)
    assert body_start is with_head  # the body trains against the new head
    assert all(torch.equal(a, b) for a, b in zip(with_head.layers[:3], head_start.layers[:3], strict=True))
    assert not torch.equal(with_head.layers[3], head_start.layers[3])
    assert torch.equal(trained.layers[3], with_head.layers[3])
    assert torch.equal(new_state.layers[3], trained.layers[3])
    assert update.delta[3] is None and all(d is not None for d in update.delta[:3])
