"""Model zoo and the definition of a *layer*.

A layer is one module that owns parameters directly (Conv, Linear, a norm's affine
weight and bias): its weight and bias move together and get one aggregation weight.
Buffers (e.g. normalization running statistics) are not part of any layer: they never
leave the client (they live in its ``ClientState``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pfedla.registry import MODELS
from pfedla.seeding import derive_seed


class CNN(nn.Module):
    """The pFedLA paper-style CNN: two 5x5 conv+pool blocks, then two fully connected layers."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 32,
                 hidden: int = 256):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 5, padding=2)
        self.conv2 = nn.Conv2d(width, 2 * width, 5, padding=2)
        side = image_size // 4
        self.fc1 = nn.Linear(2 * width * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class CNNBN(nn.Module):
    """The paper-style CNN with BatchNorm after each convolution (what FedBN keeps local). Its
    convolutions and dense layers draw the same initial weights as ``CNN`` for one seed."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 32,
                 hidden: int = 256):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 5, padding=2)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 5, padding=2)
        self.bn2 = nn.BatchNorm2d(2 * width)
        side = image_size // 4
        self.fc1 = nn.Linear(2 * width * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class MLP(nn.Module):
    """A small fully connected network for vectors or flattened images."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 200):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


class MLPBN(nn.Module):
    """The MLP with BatchNorm after each hidden layer: a model FedBN means something for that is
    cheap enough for CPU comparisons (same initial dense weights as ``MLP`` for one seed)."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 200):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.bn2 = nn.BatchNorm1d(hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.fc1(x.flatten(1))))
        return self.fc3(torch.relu(self.bn2(self.fc2(x))))


# The CNNs pool twice by 2: a side below 4 pixels pools down to nothing.
CNN_MIN_SIDE = 4
CONVOLUTIONAL = {"cnn": CNN, "cnn_bn": CNNBN}
VECTOR = {"mlp": MLP, "mlp_bn": MLPBN}  # flatten any input
# pfedla.registry.MODELS (torch-free, for the config) describes each of these; a test checks them


def unsupported_input(name: str, input_shape: tuple[int, ...]) -> str | None:
    """Why model ``name`` cannot take one sample of ``input_shape``, or None when it can."""
    if not MODELS[name].images_only:
        return None
    if len(input_shape) != 3:
        return f"model '{name}' needs image inputs [channels, height, width], got shape {input_shape}"
    _, height, width = input_shape
    if min(height, width) < CNN_MIN_SIDE:
        return (f"model '{name}' needs images of at least {CNN_MIN_SIDE}x{CNN_MIN_SIDE} pixels, "
                f"got {height}x{width}")
    if height // 4 != width // 4:  # its first dense layer is sized from the height alone
        return f"model '{name}' needs square images, got {height}x{width}"
    return None


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """A freshly initialised model; the same seed gives the same weights everywhere."""
    if problem := unsupported_input(name, input_shape):
        raise ValueError(problem)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "model-init"))
        if name in CONVOLUTIONAL:
            channels, height, _ = input_shape
            width, hidden = (16, 128) if height <= 8 else (32, 512)
            return CONVOLUTIONAL[name](channels, height, num_classes, width=width, hidden=hidden)
        return VECTOR[name](math.prod(input_shape), num_classes)


NORMALIZATION = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class ParamSlot:
    """Where one named parameter lives inside its layer's flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class LayerLayout:
    """The model's layers in order; each layer is a flat vector of its parameters."""

    names: tuple[str, ...]
    slots: tuple[tuple[ParamSlot, ...], ...]
    norm_layers: frozenset[int] = frozenset()  # indices of normalization layers (their affine part)

    @classmethod
    def of(cls, model: nn.Module) -> LayerLayout:
        names, slots, norms = [], [], set()
        for module_name, module in model.named_modules():
            own = list(module.named_parameters(recurse=False))
            if not own:
                continue
            if isinstance(module, NORMALIZATION):
                norms.add(len(names))
            offset, layer_slots = 0, []
            for param_name, param in own:
                full = f"{module_name}.{param_name}" if module_name else param_name
                layer_slots.append(ParamSlot(full, tuple(param.shape), offset))
                offset += param.numel()
            names.append(module_name or "<root>")
            slots.append(tuple(layer_slots))
        return cls(tuple(names), tuple(slots), frozenset(norms))

    @property
    def num_layers(self) -> int:
        return len(self.names)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(sum(s.numel for s in layer) for layer in self.slots)

    def flatten(self, params: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Named parameters -> one flat vector per layer."""
        return [torch.cat([params[s.name].reshape(-1) for s in layer]) for layer in self.slots]

    def unflatten(self, layers: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """One flat vector per layer -> named parameters (views, no copies)."""
        params = {}
        for flat, layer in zip(layers, self.slots, strict=True):
            for s in layer:
                params[s.name] = flat[s.offset : s.offset + s.numel].view(s.shape)
        return params

    def check(self, layers: list[torch.Tensor | None], skip: frozenset[int] = frozenset()) -> None:
        """Raise ValueError unless ``layers`` fits this layout (``skip``: layers not checked)."""
        if len(layers) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers, got {len(layers)}")
        for index, (name, size, flat) in enumerate(zip(self.names, self.sizes, layers, strict=True)):
            if index not in skip and (flat is None or flat.ndim != 1 or flat.numel() != size):
                shape = None if flat is None else tuple(flat.shape)
                raise ValueError(f"layer {name}: expected {size} values, got shape {shape}")


def initial_layers(model: nn.Module) -> list[torch.Tensor]:
    """The model's current parameters as detached flat layer vectors."""
    layout = LayerLayout.of(model)
    return [t.detach().clone() for t in layout.flatten(dict(model.named_parameters()))]


def initial_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's buffers (normalization running statistics) as detached copies, by name."""
    return {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
