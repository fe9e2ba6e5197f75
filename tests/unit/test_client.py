"""Local training and evaluation on tensors, and device selection."""

import pytest
import torch

from pfedla.client import (
    ClientTimeout,
    ClientUpdate,
    LocalTrainer,
    ModelState,
    TrainSettings,
    evaluate_client,
    failure_reason,
    screen_updates,
    select_device,
)
from pfedla.errors import ConfigError
from pfedla.models import LayerLayout, build_model, initial_layers


def toy_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=gen)
    y = (x[:, 0] > 0).long()
    model = build_model("mlp", (5,), 2, seed=0)
    return model, LayerLayout.of(model), x, y


def test_training_starts_from_the_given_layers_and_learns():
    model, layout, x, y = toy_problem()
    start = initial_layers(model)
    before = evaluate_client(model, layout, ModelState(start, {}), x, y)
    settings = TrainSettings(epochs=20, batch_size=16, lr=0.1)
    trainer = LocalTrainer(model, layout)
    trained, loss = trainer.train(ModelState(start, {}), x, y, settings, torch.Generator().manual_seed(1))
    after = evaluate_client(model, layout, trained, x, y)
    assert after.accuracy > max(before.accuracy, 0.9)
    assert after.loss_sum < before.loss_sum and loss > 0
    # The start is not modified, and the module's own weights are not used or touched.
    assert all(torch.equal(a, b) for a, b in zip(start, initial_layers(model)))
    shifted = [t + 1.0 for t in start]
    trained_shifted, _ = trainer.train(ModelState(shifted, {}), x, y, TrainSettings(1, 64, 0.0),
                                      torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(trained_shifted.layers, shifted))


def test_same_generator_seed_same_result():
    model, layout, x, y = toy_problem()
    settings = TrainSettings(epochs=2, batch_size=8, lr=0.1)
    runs = [LocalTrainer(model, layout).train(ModelState(initial_layers(model), {}), x, y, settings,
                         torch.Generator().manual_seed(5))[0].layers for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_client_timeout_stops_between_batches_and_a_generous_one_changes_nothing():
    model, layout, x, y = toy_problem()
    trainer = LocalTrainer(model, layout)

    def train(timeout):
        settings = TrainSettings(epochs=2, batch_size=8, lr=0.1, timeout=timeout)
        return trainer.train(ModelState(initial_layers(model), {}), x, y, settings,
                             torch.Generator().manual_seed(5))

    expected = r"0 of 16 batches done when client_timeout=1e-09 s ran out"
    with pytest.raises(ClientTimeout, match=expected) as caught:
        train(1e-9)
    assert failure_reason(caught.value).startswith("timed out: 0 of 16 batches")
    assert failure_reason(ValueError("disk full")) == "training raised ValueError: disk full"
    unlimited, generous = train(None), train(3600.0)
    assert all(torch.equal(a, b) for a, b in zip(unlimited[0].layers, generous[0].layers))


def test_evaluation_counts():
    model, layout, x, y = toy_problem()
    result = evaluate_client(model, layout, ModelState(initial_layers(model), {}), x, y, batch_size=10)
    assert result.count == 64 and 0 <= result.correct <= 64
    assert result.accuracy == result.correct / 64


def test_device_selection():
    assert select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device"):
            select_device("cuda")


def scaled_update(client_id: int, scale: float) -> ClientUpdate:
    return ClientUpdate(client_id, 10, [torch.full((3, 4), scale), torch.full((4,), scale)], 0.1)


def test_screening_leaves_out_an_update_far_above_the_others_median():
    updates = [scaled_update(0, 1.0), scaled_update(1, 1.5), scaled_update(2, 0.8), scaled_update(3, 1e6)]
    accepted, failures = screen_updates(updates, max_norm=None, norm_ratio=10.0)
    assert [u.client_id for u in accepted] == [0, 1, 2]
    assert [f.client_id for f in failures] == [3]
    assert "exceeds update_norm_ratio=10 times the median" in failures[0].reason
    # off: everything finite passes
    assert len(screen_updates(updates, max_norm=None, norm_ratio=None)[0]) == 4


def test_screening_two_clients_judges_each_by_the_other():
    """The median of all norms would be (1 + 1e6) / 2: the attacker would pass at ratio 10."""
    accepted, failures = screen_updates([scaled_update(0, 1.0), scaled_update(1, 1e6)], None, 10.0)
    assert [u.client_id for u in accepted] == [0] and [f.client_id for f in failures] == [1]


def test_screening_applies_the_absolute_limit_and_finiteness_first():
    broken = scaled_update(3, 1.0)
    broken.delta[0][0, 0] = float("nan")
    updates = [scaled_update(2, 50.0), broken, scaled_update(0, 1.0), scaled_update(1, 8.0)]
    accepted, failures = screen_updates(updates, max_norm=100.0, norm_ratio=10.0)
    # client 2 (norm 200) is over the absolute limit, so client 1 (norm 32) is judged against
    # client 0 alone (norm 4): within 10x
    assert [u.client_id for u in accepted] == [0, 1]
    assert [(f.client_id, f.reason) for f in failures] == [
        (2, "update L2 norm 200 exceeds max_update_norm 100"), (3, "update has NaN or Inf values")]


def test_screening_without_a_scale_accepts():
    """Peers whose updates are all zero give no scale to judge by."""
    accepted, _ = screen_updates([scaled_update(0, 0.0), scaled_update(1, 0.0), scaled_update(2, 3.0)],
                                 None, 10.0)
    assert [u.client_id for u in accepted] == [0, 1, 2]


def test_evaluation_uses_running_statistics_so_a_sample_scores_the_same_in_any_batch():
    """In train mode BatchNorm would normalize with the batch's own statistics."""
    model = build_model("cnn_bn", (1, 8, 8), 3, seed=0)
    layout = LayerLayout.of(model)
    x, y = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(12) % 3
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    buffers["bn1.running_mean"] += 0.5
    state = ModelState(initial_layers(model), buffers)
    whole = evaluate_client(model, layout, state, x, y, batch_size=12)
    one_by_one = evaluate_client(model, layout, state, x, y, batch_size=1)
    assert whole.correct == one_by_one.correct and whole.loss_sum == pytest.approx(one_by_one.loss_sum)
    shifted = evaluate_client(model, layout, ModelState(state.layers, dict(model.named_buffers())), x, y)
    assert shifted.loss_sum != pytest.approx(whole.loss_sum)  # the given statistics are the ones used
    assert model.training  # the module's mode is restored


def test_only_trainable_layers_move_and_buffers_come_back_updated():
    model = build_model("cnn_bn", (1, 8, 8), 3, seed=0)
    layout = LayerLayout.of(model)
    x, y = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3
    start = ModelState(initial_layers(model), {name: b.clone() for name, b in model.named_buffers()})
    trained, _ = LocalTrainer(model, layout).train(start, x, y, TrainSettings(1, 8, 0.1),
                                                   torch.Generator().manual_seed(1),
                                                   trainable=frozenset({4, 5}))
    pairs = enumerate(zip(trained.layers, start.layers, strict=True))
    moved = [i for i, (a, b) in pairs if not torch.equal(a, b)]
    assert moved == [4, 5]
    assert int(trained.buffers["bn1.num_batches_tracked"]) == 2
    assert int(start.buffers["bn1.num_batches_tracked"]) == 0  # the start is not modified


def test_a_batchnorm_model_skips_a_last_batch_of_one_sample_which_it_cannot_normalize():
    model = build_model("mlp_bn", (5,), 2, seed=0)
    layout = LayerLayout.of(model)
    x, y = torch.randn(9, 5, generator=torch.Generator().manual_seed(0)), torch.arange(9) % 2
    start = ModelState(initial_layers(model), {name: b.clone() for name, b in model.named_buffers()})
    trained, _ = LocalTrainer(model, layout).train(start, x, y, TrainSettings(2, 4, 0.1),
                                                   torch.Generator().manual_seed(1))
    assert int(trained.buffers["bn1.num_batches_tracked"]) == 4  # 4 + 4 (+ 1 skipped), twice
    plain = build_model("mlp", (5,), 2, seed=0)  # without BatchNorm the single sample trains
    trained_plain, _ = LocalTrainer(plain, LayerLayout.of(plain)).train(
        ModelState(initial_layers(plain), {}), x[:1], y[:1], TrainSettings(1, 4, 0.1), torch.Generator())
    assert not torch.equal(trained_plain.layers[0], initial_layers(plain)[0])
