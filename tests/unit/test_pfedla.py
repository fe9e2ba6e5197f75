"""The pFedLA math: simplex weights, θ̄, the surrogate gradient and its sign, HeurpFedLA."""

import numpy as np
import pytest
import torch

from pfedla.algorithms import pfedla as pf
from pfedla.algorithms.fedavg import FedAvgStrategy
from pfedla.client import ClientUpdate
from pfedla.config import config_from_dict
from pfedla.data import ClientShard, FederatedData
from pfedla.data.sources import feature_statistics, load_digits, standardize
from pfedla.simulation import Simulation


def strategy_for(num_clients=5, sizes=(7, 3, 11), heur_k=0, hn_lr=0.01, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=dtype) for s in sizes]
    strategy = pf.PFedLAStrategy(init, num_clients, hn_lr=hn_lr, embedding_dim=4, hidden_dim=6,
                                 heur_k=heur_k, generator=torch.Generator().manual_seed(seed + 1))
    # Distinct client models, as after some training.
    for rows in strategy.models.rows:
        rows.copy_(torch.randn(rows.shape, generator=gen, dtype=dtype))
    if dtype != torch.float32:
        strategy.hypernetworks.to(dtype)
    return strategy


def test_alpha_is_on_the_simplex_even_when_heads_are_clipped():
    heads = torch.randn(6, 4, 5) * 3
    heads[0, 0] = -1.0  # every output below zero
    alpha = pf.normalize_heads(heads)
    assert (alpha >= 0).all()
    torch.testing.assert_close(alpha.sum(-1), torch.ones(6, 4))
    torch.testing.assert_close(alpha[0, 0], torch.full((5,), 0.2))


def test_hypernetwork_outputs_are_on_the_simplex():
    strategy = strategy_for()
    alpha = strategy.layer_weights()
    assert alpha.shape == (5, 3, 5)
    assert (alpha >= 0).all()
    torch.testing.assert_close(alpha.sum(-1), torch.ones(5, 3))


def test_aggregate_layers_matches_a_naive_per_client_loop():
    strategy = strategy_for()
    clients = torch.tensor([3, 0, 4])
    alpha = strategy.hypernetworks(clients).detach()
    batched = pf.aggregate_layers(alpha, strategy.models.rows)
    for s in range(len(clients)):
        for layer, rows in enumerate(strategy.models.rows):
            naive = sum(alpha[s, layer, j] * rows[j] for j in range(rows.shape[0]))
            torch.testing.assert_close(batched[layer][s], naive)
    instructions = strategy.configure_fit(0, [3, 0, 4])
    torch.testing.assert_close(instructions[0].layers[1], batched[1][1])


def test_hypernetwork_gradient_matches_finite_differences_of_the_surrogate():
    strategy = strategy_for(dtype=torch.float64)
    clients = torch.tensor([1, 2, 4])
    gen = torch.Generator().manual_seed(7)
    deltas = [torch.randn(3, rows.shape[1], generator=gen, dtype=torch.float64)
              for rows in strategy.models.rows]
    grads, _ = strategy.hypernetwork_gradients(clients, deltas)
    # The surrogate: f(ψ) = Σ_l <θ̄^l(ψ), d^l> / scale^l with d = θ̄(ψ0) − θ'(ψ0) = −Δ and the
    # layer scales held fixed.
    scales = pf.layer_scales(deltas, strategy.models.rows)
    fixed = [-d / scales[:, layer, None] for layer, d in enumerate(deltas)]
    params = dict(strategy.hypernetworks.named_parameters())

    def surrogate() -> float:
        with torch.no_grad():
            bar = pf.aggregate_layers(strategy.hypernetworks(clients), strategy.models.rows)
            return float(sum((b * d).sum() for b, d in zip(bar, fixed)))

    eps = 1e-6
    for name in ("head_w", "head_b", "w1", "embeddings"):
        direction = torch.randn(params[name].shape, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            params[name] += eps * direction
            up = surrogate()
            params[name] -= 2 * eps * direction
            down = surrogate()
            params[name] += eps * direction
        numeric = (up - down) / (2 * eps)
        analytic = float((grads[name] * direction).sum())
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9), name
    assert any(grads[name].abs().sum() > 0 for name in grads)
    # Rows of clients outside the batch get no gradient.
    assert grads["head_w"][0].abs().sum() == 0 and grads["head_w"][3].abs().sum() == 0


def test_frozen_uniform_alpha_with_full_participation_equals_fedavg():
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen) for s in (6, 4)]
    n = 4
    pfedla = pf.PFedLAStrategy(init, n, hn_lr=0.0, embedding_dim=3, hidden_dim=5, heur_k=0,
                               generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # uniform α: zero head weights, equal biases
        pfedla.hypernetworks.head_w.zero_()
        pfedla.hypernetworks.head_b.fill_(1.0)
    fedavg = FedAvgStrategy(init)
    clients = list(range(n))
    sent_p = pfedla.configure_fit(0, clients)
    sent_f = fedavg.configure_fit(0, clients)
    updates = []
    for c in clients:
        for a, b in zip(sent_p[c].layers, sent_f[c].layers):
            torch.testing.assert_close(a, b)
        # Equal sample counts: FedAvg's weighted mean is then the plain mean.
        updates.append(ClientUpdate(c, 10, [torch.randn(s, generator=gen) for s in (6, 4)], 0.0))
    pfedla.aggregate_fit(0, updates, [])
    fedavg.aggregate_fit(0, updates, [])
    next_p = pfedla.configure_fit(1, clients)
    for c in clients:
        for a, b in zip(next_p[c].layers, fedavg.personalized_layers(c)):
            torch.testing.assert_close(a, b)


def test_server_model_becomes_personalized_start_plus_delta():
    strategy = strategy_for(hn_lr=0.0)
    sent = strategy.configure_fit(0, [2])
    delta = [torch.full_like(t, 0.5) for t in sent[2].layers]
    strategy.aggregate_fit(0, [ClientUpdate(2, 5, delta, 0.0)], [])
    for layer, start, d in zip(strategy.models.client(2), sent[2].layers, delta):
        torch.testing.assert_close(layer, start + d)


@pytest.mark.parametrize("k", [1, 2])
def test_heurpfedla_keeps_exactly_k_layers_local(k):
    strategy = strategy_for(heur_k=k)
    clients = [0, 3]
    alpha = strategy.layer_weights()
    instructions = strategy.configure_fit(0, clients)
    for c in clients:
        kept = instructions[c].kept_local
        assert len(kept) == k
        # The kept layers are the ones with the largest self-weight.
        expected = set(torch.topk(alpha[c, :, c], k).indices.tolist())
        assert kept == expected
        for layer in kept:  # a kept layer is the client's own model, untouched by others
            torch.testing.assert_close(instructions[c].layers[layer], strategy.models.rows[layer][c])
        full = sum(t.numel() * 4 for t in instructions[c].layers)
        assert instructions[c].bytes_sent() == full - sum(
            instructions[c].layers[i].numel() * 4 for i in kept)
    deltas = [torch.randn(2, rows.shape[1]) for rows in strategy.models.rows]
    _, kept_alpha = strategy.hypernetwork_gradients(torch.tensor(clients), deltas)
    # Kept layers are excluded from the gradient: perturbing their deltas changes nothing.
    keep = pf.heuristic_keep_mask(kept_alpha, torch.tensor(clients), k)
    changed = [d.clone() for d in deltas]
    for s in range(2):
        for layer in torch.nonzero(keep[s]).flatten().tolist():
            changed[layer][s] += 100.0
    g1, _ = strategy.hypernetwork_gradients(torch.tensor(clients), deltas)
    g2, _ = strategy.hypernetwork_gradients(torch.tensor(clients), changed)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name])


def test_heurpfedla_raw_alpha_is_the_hypernetworks_output_and_differs_only_on_kept_layers():
    strategy = strategy_for(heur_k=1)
    raw, masked = strategy.raw_layer_weights(), strategy.layer_weights()
    everyone = torch.arange(5)
    torch.testing.assert_close(raw, strategy.hypernetworks(everyone).detach(), rtol=0, atol=0)
    for alpha in (raw, masked):
        torch.testing.assert_close(alpha.sum(-1), torch.ones(5, 3))
    for client in range(5):
        kept = int(raw[client, :, client].argmax())  # k=1: the layer it trusts itself most in
        own = torch.nn.functional.one_hot(torch.tensor(client), 5).float()
        for layer in range(3):
            if layer == kept:
                assert torch.equal(masked[client, layer], own)
                assert not torch.equal(raw[client, layer], own)
            else:
                assert torch.equal(masked[client, layer], raw[client, layer])
    assert strategy_for(heur_k=0).raw_layer_weights() is None  # nothing is masked: α is all there is


def test_clients_outside_the_round_keep_their_hypernetwork_exactly():
    strategy = strategy_for(hn_lr=0.05)
    before = {k: p.detach().clone() for k, p in strategy.hypernetworks.named_parameters()}
    sent = strategy.configure_fit(0, [1, 2])
    updates = [ClientUpdate(c, 5, [torch.randn_like(t) for t in sent[c].layers], 0.0) for c in (1, 2)]
    strategy.aggregate_fit(0, updates, [])
    for name, param in strategy.hypernetworks.named_parameters():
        torch.testing.assert_close(param[0], before[name][0])
        torch.testing.assert_close(param[3], before[name][3])
    assert not torch.equal(strategy.hypernetworks.head_w[1], before["head_w"][1])


def test_round_zero_with_identical_models_leaves_alpha_exactly_where_it_was():
    """Every Θ_j is the initial model, so the objective does not depend on α: its true gradient is
    zero. Without removing the constant part of ∂/∂α, float32 rounding left ~1e-7 that Adam (eps
    1e-8) turned into a full step, moving α in a random direction."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in (50, 20, 30)]
    strategy = pf.PFedLAStrategy(init, 6, hn_lr=0.03, embedding_dim=4, hidden_dim=6, heur_k=0,
                                 generator=torch.Generator().manual_seed(1))
    alpha_before = strategy.layer_weights()
    sent = strategy.configure_fit(0, list(range(6)))
    updates = [ClientUpdate(c, 5, [0.01 * torch.randn(t.shape, generator=gen) for t in sent[c].layers], 0.0)
               for c in range(6)]
    strategy.aggregate_fit(0, updates, [])
    assert torch.equal(strategy.layer_weights(), alpha_before)
    # once the models differ, the same step moves α
    sent = strategy.configure_fit(1, list(range(6)))
    strategy.aggregate_fit(1, [ClientUpdate(c, 5, [0.01 * torch.randn(t.shape, generator=gen)
                                                   for t in sent[c].layers], 0.0) for c in range(6)], [])
    assert not torch.equal(strategy.layer_weights(), alpha_before)


def relu_heads(head_outputs: torch.Tensor) -> torch.Tensor:
    """The heads before the fix: ReLU then normalise."""
    positive = torch.relu(head_outputs) + pf.ALPHA_FLOOR
    return positive / positive.sum(dim=-1, keepdim=True)


def recovery_from_the_floor(rounds=40) -> tuple[float, float]:
    """α_02 of client 0 pushed to (nearly) nothing, then rounds whose updates all point to client 2's
    model: (α_02 before, α_02 after)."""
    gen = torch.Generator().manual_seed(0)
    strategy = pf.PFedLAStrategy([torch.randn(30, generator=gen)], 3, hn_lr=1.0, embedding_dim=4,
                                 hidden_dim=6, heur_k=0, generator=torch.Generator().manual_seed(1))
    strategy.models.rows[0].copy_(torch.randn(3, 30, generator=gen))
    with torch.no_grad():
        strategy.hypernetworks.head_b[0, 0, 2] = -3.0  # a ReLU head there is clipped to zero
    before = float(strategy.layer_weights()[0, 0, 2])
    for round_idx in range(rounds):
        start = strategy.configure_fit(round_idx, [0])[0].layers[0]
        toward_2 = 0.1 * (strategy.models.rows[0][2] - start)
        strategy.aggregate_fit(round_idx, [ClientUpdate(0, 5, [toward_2], 0.0)], [])
    return before, float(strategy.layer_weights()[0, 0, 2])


def test_an_alpha_entry_driven_to_the_floor_recovers_when_the_gradient_favors_it():
    before, after = recovery_from_the_floor()
    assert before < 0.05 and after > 0.5


def test_relu_heads_stay_at_the_floor(monkeypatch):
    """The issue-13 lead: a ReLU head at or below zero has zero gradient, and its α never returns."""
    monkeypatch.setattr(pf, "normalize_heads", relu_heads)
    before, after = recovery_from_the_floor()
    assert before < 1e-9 and after < 1e-9


def alpha_step(deviation: float, scale: float = 1.0) -> torch.Tensor:
    """How much client 0's α moves in one step when the four client models differ from their mean
    by ``deviation`` (relative) and client 0's update points to client 1's model; all parameters
    and updates times ``scale``."""
    gen = torch.Generator().manual_seed(5)
    center, spread = torch.randn(40, generator=gen), torch.randn(4, 40, generator=gen)
    strategy = pf.PFedLAStrategy([center], 4, hn_lr=1.0, embedding_dim=4, hidden_dim=6, heur_k=0,
                                 generator=torch.Generator().manual_seed(2))
    strategy.models.rows[0].copy_(scale * (center + deviation * spread))
    before = strategy.layer_weights()
    start = strategy.configure_fit(1, [0])[0].layers[0]
    update = 0.05 * scale * center.norm() * unit(strategy.models.rows[0][1] - start)
    strategy.aggregate_fit(1, [ClientUpdate(0, 5, [update], 0.0)], [])
    return (strategy.layer_weights() - before)[0].abs().max()


def unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.norm()


def test_alpha_moves_with_how_different_the_client_models_are():
    """Where the clients' models barely differ (alike clients), α barely moves; an optimizer that
    normalizes the step size (Adam) moved it as far as for very different clients."""
    alike, different = alpha_step(0.01), alpha_step(1.0)
    assert different > 1e-3
    assert alike < 0.05 * different


def test_alpha_step_does_not_depend_on_the_scale_of_the_parameters():
    """Each layer's surrogate term is divided by its scale: one hn_lr fits any model."""
    torch.testing.assert_close(alpha_step(0.5, scale=10.0), alpha_step(0.5), rtol=1e-3, atol=1e-6)


def test_personalized_model_is_the_aggregate_with_the_current_alpha():
    """θ̄_i from the α and client models after the round, which is what client i starts from next."""
    strategy = strategy_for(hn_lr=0.5)
    sent = strategy.configure_fit(0, [0, 1, 2, 3, 4])
    gen = torch.Generator().manual_seed(4)
    updates = [ClientUpdate(c, 5, [torch.randn(t.shape, generator=gen) for t in sent[c].layers], 0.0)
               for c in range(5)]
    strategy.aggregate_fit(0, updates, [])
    following = strategy.configure_fit(1, [0, 1, 2, 3, 4])
    for client in range(5):
        for personal, start, own in zip(strategy.personalized_layers(client), following[client].layers,
                                        strategy.models.client(client)):
            torch.testing.assert_close(personal, start)
            assert not torch.allclose(personal, own)


def test_state_dict_round_trip_restores_the_server():
    strategy = strategy_for()
    sent = strategy.configure_fit(0, [0, 1])
    strategy.aggregate_fit(0, [ClientUpdate(c, 5, [torch.randn_like(t) for t in sent[c].layers], 0.0)
                               for c in (0, 1)], [])
    restored = strategy_for(seed=9)
    restored.load_state_dict(strategy.state_dict())
    torch.testing.assert_close(restored.layer_weights(), strategy.layer_weights())
    for a, b in zip(restored.models.rows, strategy.models.rows):
        torch.testing.assert_close(a, b)


def clustered_data(num_clients=8, seed=0) -> FederatedData:
    """Digits split iid; the second half of the clients sees labels shifted by 5 (another task)."""
    pooled = load_digits()
    # the sign check does not depend on which samples the scaling comes from: all of them here
    features = standardize(pooled.features, *feature_statistics([pooled.features]))
    rng = np.random.default_rng(seed)
    order = torch.from_numpy(rng.permutation(len(pooled.labels)))
    shards = []
    for client, part in enumerate(torch.tensor_split(order, num_clients)):
        x, y = features[part], pooled.labels[part]
        if client >= num_clients // 2:
            y = (y + 5) % 10
        cut = len(y) * 3 // 4
        shards.append(ClientShard(x[:cut], y[:cut], x[cut:], y[cut:]))
    return FederatedData(shards, 10, (1, 8, 8))


def same_group_mass(alpha: np.ndarray) -> float:
    n = alpha.shape[0]
    group = np.arange(n) >= n // 2
    same = group[:, None] == group[None, :]
    return float((alpha * same[:, None, :]).sum(-1).mean())


def run_clustered(rounds=12, hn_lr=10.0) -> float:
    # hn_lr above the default: α moves as far as the models differ, and in 12 rounds on these tiny
    # shards they have not yet drifted far apart.
    config = config_from_dict({"clients": 8, "rounds": rounds, "algorithms": ["pfedla"],
                               "local_epochs": 1, "device": "cpu", "pfedla": {"hn_lr": hn_lr}})
    simulation = Simulation(config, clustered_data(), torch.device("cpu"), tracker=None, progress=False)
    strategy, states = simulation.start("pfedla")
    for round_idx in range(rounds):
        simulation.run_round(strategy, states, round_idx)
    return same_group_mass(strategy.layer_weights().numpy())


def test_descent_sign_puts_weight_on_the_same_group():
    assert run_clustered() > 0.8


def test_flipped_sign_is_caught(monkeypatch):
    """The public bug: ascent (grad_outputs = θ' − θ̄). The same check must then fail."""
    original = pf.surrogate_alpha_grad
    monkeypatch.setattr(pf, "surrogate_alpha_grad", lambda deltas, stack: -original(deltas, stack))
    assert run_clustered() < 0.8
