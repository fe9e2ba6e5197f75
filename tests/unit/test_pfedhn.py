"""pFedHN: the generated models, the gradient of its objective and its sign, untouched absentees,
checkpoints that continue bit-identically, and learning on a small problem."""

import pytest
import torch

from pfedla import storage
from pfedla.algorithms import pfedhn as ph
from pfedla.client import ClientFailure, ClientUpdate
from pfedla.config import config_from_dict
from pfedla.errors import ArtifactError
from pfedla.simulation import run_experiment

SIZES = (7, 3, 11)


def strategy_for(num_clients=5, sizes=SIZES, lr=1e-3, seed=0, dtype=torch.float32, warm=True):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=dtype) for s in sizes]
    strategy = ph.PFedHNStrategy(init, num_clients, lr=lr, embedding_dim=4, hidden_dim=6,
                                 generator=torch.Generator().manual_seed(seed + 1))
    if warm:  # non-zero head weights, as after some rounds: every parameter then has a gradient
        with torch.no_grad():
            for weight in strategy.hypernetwork.head_w:
                weight.copy_(0.3 * torch.randn(weight.shape, generator=gen, dtype=dtype))
    return strategy


def random_updates(strategy, round_idx, clients, gen, scale=0.1):
    sent = strategy.configure_fit(round_idx, clients)
    return [ClientUpdate(c, 10, [scale * torch.randn(t.shape, generator=gen, dtype=t.dtype)
                                 for t in sent[c].layers], 0.0) for c in clients]


def test_every_client_starts_from_the_model_the_other_algorithms_start_from():
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in SIZES]
    strategy = ph.PFedHNStrategy(init, 4, lr=1e-3, embedding_dim=3, hidden_dim=5,
                                 generator=torch.Generator().manual_seed(1))
    sent = strategy.configure_fit(0, [0, 1, 2, 3])
    for client in range(4):
        for start, layer in zip(init, sent[client].layers, strict=True):
            assert torch.equal(start, layer)
        assert sent[client].kept_local == frozenset()  # every layer travels


def test_hypernetwork_gradient_matches_finite_differences_of_the_objective():
    """J = (1/S) Σ_s ½‖h(v_s) − θ'_s‖² with θ' = h + Δ fixed, perturbed one parameter entry at a time."""
    strategy = strategy_for(dtype=torch.float64)
    clients = torch.tensor([1, 2, 4])
    gen = torch.Generator().manual_seed(7)
    deltas = [torch.randn(3, size, generator=gen, dtype=torch.float64) for size in SIZES]
    with torch.no_grad():
        targets = [model + delta for model, delta in zip(strategy.hypernetwork(clients), deltas, strict=True)]
    grads = strategy.hypernetwork_gradients(clients, deltas)

    def objective() -> float:
        with torch.no_grad():
            models = strategy.hypernetwork(clients)
        return float(sum(0.5 * ((m - t) ** 2).sum() for m, t in zip(models, targets, strict=True)) / 3)

    eps = 1e-6
    for name, param in strategy.hypernetwork.named_parameters():
        flat, grad = param.data.view(-1), grads[name].reshape(-1)
        if name == "embeddings":  # entries of the participants' rows: clients 1, 2, 4 of 5
            entries = [1 * 4 + 0, 2 * 4 + 3, 4 * 4 + 1]
        else:
            entries = torch.randperm(flat.numel(), generator=gen)[:3].tolist()
        for entry in entries:
            original = float(flat[entry])
            flat[entry] = original + eps
            up = objective()
            flat[entry] = original - eps
            down = objective()
            flat[entry] = original
            numeric = (up - down) / (2 * eps)
            assert float(grad[entry]) == pytest.approx(numeric, rel=1e-6, abs=1e-9), (name, entry)
            assert abs(numeric) > 1e-6, (name, entry)  # a real test: this entry does have a gradient
    for absent in (0, 3):  # J does not depend on the embeddings of clients outside the round
        assert torch.equal(grads["embeddings"][absent], torch.zeros(4, dtype=torch.float64))


def distance_to_fixed_targets(rounds=150) -> tuple[float, float]:
    """Clients that always return their own fixed model θ*_i: Σ_i ‖h(v_i) − θ*_i‖ before and after."""
    strategy = strategy_for(num_clients=4, lr=0.01, warm=False)
    gen = torch.Generator().manual_seed(3)
    targets = [[torch.randn(size, generator=gen) for size in SIZES] for _ in range(4)]

    def distance() -> float:
        gaps = [[a - b for a, b in zip(strategy.personalized_layers(c), targets[c])] for c in range(4)]
        return sum(float(torch.cat(gap).norm()) for gap in gaps)

    before = distance()
    for round_idx in range(rounds):
        sent = strategy.configure_fit(round_idx, range(4))
        returned = [[t - s for t, s in zip(targets[c], sent[c].layers)] for c in range(4)]
        strategy.aggregate_fit(round_idx, [ClientUpdate(c, 10, returned[c], 0.0) for c in range(4)], [])
    return before, distance()


def test_descent_moves_every_generated_model_to_its_own_target():
    before, after = distance_to_fixed_targets()
    assert after < 0.05 * before


def test_flipped_sign_is_caught(monkeypatch):
    """The ascent bug (grad_outputs = θ' − θ = +Δ): the generated models run away from their targets."""
    original = ph.objective_output_grads
    monkeypatch.setattr(ph, "objective_output_grads", lambda deltas: [-g for g in original(deltas)])
    before, after = distance_to_fixed_targets()
    assert after > before


def test_one_step_lowers_the_objective_of_the_round():
    strategy = strategy_for(lr=1e-3)
    clients = [0, 2, 3]
    updates = random_updates(strategy, 0, clients, torch.Generator().manual_seed(4))
    sent = strategy.configure_fit(0, clients)
    targets = {u.client_id: [s + d for s, d in zip(sent[u.client_id].layers, u.delta)] for u in updates}

    def objective() -> float:
        return sum(0.5 * float(sum(((m - t) ** 2).sum() for m, t in
                                   zip(strategy.personalized_layers(c), targets[c]))) for c in clients)

    before = objective()
    strategy.aggregate_fit(0, updates, [])
    assert objective() < before


def test_clients_outside_the_round_keep_their_embedding_and_its_adam_state():
    strategy = strategy_for(lr=0.05)
    before = {k: t.clone() for k, t in strategy.state_dict().items()}
    strategy.aggregate_fit(0, random_updates(strategy, 0, [1, 2], torch.Generator().manual_seed(2)), [])
    after = strategy.state_dict()
    for key in ("hn.embeddings", "adam.m.embeddings", "adam.v.embeddings", "adam.steps"):
        for absent in (0, 3, 4):
            assert torch.equal(after[key][absent], before[key][absent]), (key, absent)
        for present in (1, 2):
            assert not torch.equal(after[key][present], before[key][present]), (key, present)
    # The shared hypernetwork moves, so absent clients' generated models change: that is pFedHN.
    assert not torch.equal(after["hn.head_w.0"], before["hn.head_w.0"])


def test_a_round_without_updates_changes_nothing():
    strategy = strategy_for()
    before = {k: t.clone() for k, t in strategy.state_dict().items()}
    assert strategy.aggregate_fit(0, [], [ClientFailure(1, "timed out")]) == {}
    for key, tensor in strategy.state_dict().items():
        assert torch.equal(tensor, before[key]), key


def test_a_checkpoint_continues_bit_identically():
    """Through safetensors bytes, into a server built with another seed, after Adam has state."""
    original, restored = strategy_for(seed=0), strategy_for(seed=5)
    gen = torch.Generator().manual_seed(11)
    for round_idx in range(2):
        original.aggregate_fit(round_idx, random_updates(original, round_idx, [0, 1, 3], gen), [])
    saved, _ = storage.tensors_from_bytes(storage.tensor_bytes(original.state_dict()), "checkpoint")
    restored.load_state_dict(saved)
    for strategy in (original, restored):
        updates = random_updates(strategy, 2, [1, 2, 4], torch.Generator().manual_seed(12))
        strategy.aggregate_fit(2, updates, [])
    theirs = restored.state_dict()
    for key, tensor in original.state_dict().items():
        assert torch.equal(theirs[key], tensor), key
    for client in range(5):
        for a, b in zip(original.personalized_layers(client), restored.personalized_layers(client)):
            assert torch.equal(a, b)


def test_a_fresh_server_has_the_full_checkpoint_and_refuses_another_models():
    fresh = strategy_for(warm=False).state_dict()
    assert {"shared_adam.m.head_w.2", "shared_adam.v.w1", "shared_adam.steps", "adam.steps"} <= set(fresh)
    with pytest.raises(ArtifactError, match="hn.head_w.0"):
        strategy_for(sizes=(8, 3, 11)).load_state_dict(fresh)


def test_pfedhn_learns_and_personalizes_on_digits(tmp_path):
    """4 clients with 2 classes each: one shared model must cover all 10 classes, pFedHN's need not."""
    config = config_from_dict({"clients": 4, "rounds": 8, "device": "cpu", "algorithms": ["pfedhn", "fedavg"],
                               "output_dir": str(tmp_path / "out")})
    results = run_experiment(config, progress=False, track=False).results
    assert results["pfedhn"].mean_accuracy > 0.9
    assert results["pfedhn"].mean_accuracy > results["fedavg"].mean_accuracy + 0.05
