"""The model zoo and the layer definition."""

import pytest
import torch
from torch import nn

from pfedla.models import (
    CNN,
    CNN_MIN_SIDE,
    LayerLayout,
    build_model,
    initial_buffers,
    initial_layers,
    unsupported_input,
)
from pfedla.registry import MODELS


@pytest.mark.parametrize(("shape", "classes"), [((1, 8, 8), 10), ((1, 28, 28), 10), ((3, 32, 32), 100)])
def test_cnn_fits_the_dataset_shape(shape, classes):
    model = build_model("cnn", shape, classes, seed=0)
    assert model(torch.zeros(2, *shape)).shape == (2, classes)


def test_cnn_min_side_is_the_smallest_image_the_cnn_takes():
    """The bound the data check enforces is the real one: one pixel less and the CNN's pooling fails."""
    for side in (CNN_MIN_SIDE, CNN_MIN_SIDE + 3):
        model = build_model("cnn", (1, side, side), 10, seed=0)
        assert model(torch.zeros(2, 1, side, side)).shape == (2, 10)
    side = CNN_MIN_SIDE - 1
    with pytest.warns(UserWarning, match="zero-element"):  # its dense layer gets no inputs at all
        too_small = CNN(1, side, 10, width=16, hidden=128)
    with pytest.raises(RuntimeError, match="Output size is too small"):
        too_small(torch.zeros(2, 1, side, side))
    assert unsupported_input("cnn", (1, side, side)) == \
        "model 'cnn' needs images of at least 4x4 pixels, got 3x3"
    with pytest.raises(ValueError, match="at least 4x4"):
        build_model("cnn", (1, side, side), 10, seed=0)
    assert unsupported_input("mlp", (1, 1, 1)) is None


def test_same_seed_same_weights_and_no_global_rng_side_effect():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = initial_layers(build_model("mlp", (60,), 10, seed=4))
    assert torch.equal(torch.rand(1), expected_next)
    b = initial_layers(build_model("mlp", (60,), 10, seed=4))
    c = initial_layers(build_model("mlp", (60,), 10, seed=5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_a_layer_is_a_module_with_its_weight_and_bias_and_buffers_stay_out():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    layout = LayerLayout.of(model)
    assert layout.names == ("0", "1", "3")
    assert [s.name for s in layout.slots[1]] == ["1.weight", "1.bias"]
    assert layout.sizes == (2 * 9 + 2, 2 + 2, 8 * 3 + 3)
    names = {s.name for layer in layout.slots for s in layer}
    assert not any("running" in n for n in names)


def test_flatten_unflatten_round_trip_and_check():
    model = build_model("cnn", (1, 8, 8), 10, seed=0)
    layout = LayerLayout.of(model)
    params = dict(model.named_parameters())
    layers = layout.flatten(params)
    layout.check(layers)
    back = layout.unflatten(layers)
    assert all(torch.equal(back[k], params[k]) for k in params)
    with pytest.raises(ValueError, match="expected 4 layers"):
        layout.check(layers[:-1])
    with pytest.raises(ValueError, match="conv1"):
        layout.check([layers[0][:-1], *layers[1:]])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_model_has_the_layers_the_registry_describes(name):
    shape = (6,) if name == "mlp" else (1, 8, 8)
    layout = LayerLayout.of(build_model(name, shape, 10, seed=0))
    assert (layout.num_layers, len(layout.norm_layers)) == (MODELS[name].layers, MODELS[name].norm_layers)
    assert (unsupported_input(name, (64,)) is not None) == MODELS[name].images_only


def test_cnn_bn_is_the_cnn_with_batchnorm_layers_marked_as_normalization():
    plain, normed = (build_model(name, (1, 16, 16), 10, seed=3) for name in ("cnn", "cnn_bn"))
    layout = LayerLayout.of(normed)
    assert layout.names == ("conv1", "bn1", "conv2", "bn2", "fc1", "fc2") and layout.norm_layers == {1, 3}
    assert LayerLayout.of(plain).norm_layers == frozenset()
    for name in ("conv1", "conv2", "fc1", "fc2"):  # the same draws for the same seed
        assert torch.equal(getattr(plain, name).weight, getattr(normed, name).weight)
    statistics = ("num_batches_tracked", "running_mean", "running_var")
    assert sorted(initial_buffers(normed)) == [f"bn{i}.{b}" for i in (1, 2) for b in statistics]
    assert normed(torch.randn(2, 1, 16, 16)).shape == (2, 10)
