"""The client's half of every algorithm: private layers that never travel, client state, buffers."""

import pytest
import torch

from pfedla import storage
from pfedla.algorithms import ClientState, make_strategy
from pfedla.client import ModelState
from pfedla.data import build_federated_data
from pfedla.rounds import fit_client, participants
from pfedla.simulation import Simulation, run_experiment

PRIVATE = {"fedper": {4, 5}, "fedrep": {4, 5}, "fedbn": {1, 3}, "local": {0, 1, 2, 3, 4, 5}}


# The CNN with BatchNorm, 3 of 4 clients a round, FedPer's and FedRep's heads two layers deep
BN = {"rounds": 2, "model": "cnn_bn", "participation": 0.75, "fedper": {"personal_layers": 2},
      "fedrep": {"personal_layers": 2}}


@pytest.mark.parametrize("name", sorted(PRIVATE))
def test_private_layers_are_never_sent_never_held_by_the_server_and_do_train(tiny_config, tmp_path, name):
    config = tiny_config(BN, algorithms=[name], output_dir=str(tmp_path / name))
    simulation = Simulation(config, build_federated_data(config), torch.device("cpu"), tracker=None,
                            progress=False)
    strategy = make_strategy(name, config, simulation.model)
    private, layout = PRIVATE[name], simulation.layout
    assert strategy.client_rule.private == private
    assert not any(key.endswith(f".{i}") for key in strategy.state_dict() for i in private)
    instruction = strategy.configure_fit(0, [0])[0]
    assert {i for i, layer in enumerate(instruction.layers) if layer is None} == private
    state = strategy.client_rule.initial_state(simulation.init_model)
    update, new_state = fit_client(strategy.client_rule, simulation.trainer, instruction, state,
                                   simulation.shards[0].train, config, 0, 0)
    assert {i for i, delta in enumerate(update.delta) if delta is None} == private
    assert all(not torch.equal(new_state.layers[i], state.layers[i]) for i in private)  # they trained

    result = run_experiment(config, progress=False, track=False).results[name]
    shared_bytes = sum(size * 4 for i, size in enumerate(layout.sizes) if i not in private)
    for round_idx, entry in enumerate(result.history):
        expected = shared_bytes * len(participants(config, round_idx))
        assert entry["bytes_down"] == entry["bytes_up"] == expected
    server, _ = storage.load_tensors(tmp_path / name / "seed_0" / "checkpoints" / f"{name}.safetensors")
    assert not any(key.startswith("global.") and int(key.split(".")[1]) in private for key in server)
    models, _ = storage.load_tensors(tmp_path / name / "seed_0" / "models" / f"{name}.safetensors")
    head = f"{layout.names[max(private)]}.weight"
    assert not torch.equal(models[f"client0.{head}"], models[f"client1.{head}"])  # personal layers differ


def test_client_state_round_trips_through_named_tensors_and_refuses_a_wrong_shape():
    personal = ModelState([torch.ones(3)], {"bn.running_mean": torch.zeros(2)})
    state = ClientState({1: torch.arange(4.0)}, {"bn.running_var": torch.ones(2)}, personal)
    tensors = state.tensors()
    assert sorted(tensors) == ["buffer.bn.running_var", "layer.1", "personal.0",
                               "personal_buffer.bn.running_mean"]
    again = ClientState.from_tensors(tensors, state)
    assert torch.equal(again.layers[1], state.layers[1])
    assert torch.equal(again.personal.layers[0], torch.ones(3))
    from pfedla.errors import ArtifactError
    with pytest.raises(ArtifactError, match="'layer.1' has shape"):
        ClientState.from_tensors({**tensors, "layer.1": torch.zeros(5)}, state)
    with pytest.raises(ArtifactError, match="no tensor 'personal.0'"):
        ClientState.from_tensors({k: v for k, v in tensors.items() if k != "personal.0"}, state)


def test_a_clients_running_statistics_are_untouched_by_another_clients_training(tiny_config, tmp_path):
    """Every algorithm trains all clients through one module: its buffers must be each client's own."""
    config = tiny_config(BN, algorithms=["fedavg"], output_dir=str(tmp_path / "fedavg"))
    simulation = Simulation(config, build_federated_data(config), torch.device("cpu"), tracker=None,
                            progress=False)
    strategy = make_strategy("fedavg", config, simulation.model)
    rule, trainer = strategy.client_rule, simulation.trainer
    instruction = strategy.configure_fit(0, [0, 1])

    def fit(client, state):
        return fit_client(rule, trainer, instruction[client], state, simulation.shards[client].train,
                          config, 0, client)

    initial = [rule.initial_state(simulation.init_model) for _ in range(2)]
    assert set(initial[0].buffers) == {f"bn{i}.{b}" for i in (1, 2)
                                       for b in ("running_mean", "running_var", "num_batches_tracked")}
    alone, alone_state = fit(0, initial[0])
    _, state_b = fit(1, initial[1])  # client B trains in between
    after_b, after_b_state = fit(0, initial[0])
    for name, buffer in alone_state.buffers.items():
        assert torch.equal(after_b_state.buffers[name], buffer), name
        assert torch.equal(initial[0].buffers[name], simulation.init_model.buffers[name]), name
        if name.endswith("running_mean"):
            assert not torch.equal(buffer, state_b.buffers[name])  # each has its own statistics
    assert all(torch.equal(a, b) for a, b in zip(alone.delta, after_b.delta, strict=True))
