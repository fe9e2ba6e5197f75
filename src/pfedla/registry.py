"""What exists: every algorithm with its settings section, every model's layers, every dataset's classes.

The config is validated against these tables before anything heavy is loaded, so this module
imports no torch: an algorithm names the function that builds it (``"module:function"``), which
is imported only when a run needs it. Adding an algorithm is one module under ``algorithms/`` with
a ``build(settings, context)`` function, plus its ``register(...)`` line here, with its settings
dataclass when it has settings. Each algorithm owns its section of the config (``fedprox: {mu:
0.01}``); a setting used by two algorithms is a key in each section.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pfedla.errors import ConfigError, shown


def require(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError for ``key`` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(key, message)


def require_range(value: float, key: str, low: float, high: float | None = None, why: str = "") -> None:
    """``low <= value <= high``, else a ConfigError naming both bounds (and ``why`` low matters)."""
    hint = f" ({why})" if why else ""
    require(value >= low, key, f"must be >= {low}{hint}, got {value}")
    if high is not None:
        require(value <= high, key, f"must be at most {high}, got {value}")


# -- models and datasets -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """What the config knows of a model before building it (``models.build_model`` builds it; a test
    checks every entry against the built model)."""

    layers: int  # layers in the sense of models.LayerLayout: modules with parameters
    norm_layers: int  # of those, normalization layers (BatchNorm affine)
    images_only: bool  # convolutional: needs [channels, height, width] inputs


MODELS: dict[str, ModelSpec] = {
    "cnn": ModelSpec(layers=4, norm_layers=0, images_only=True),
    "cnn_bn": ModelSpec(layers=6, norm_layers=2, images_only=True),
    "mlp": ModelSpec(layers=3, norm_layers=0, images_only=False),
    "mlp_bn": ModelSpec(layers=5, norm_layers=2, images_only=False),
}


@dataclass(frozen=True)
class DatasetSpec:
    """What the config knows of a data source before loading it."""

    num_classes: int | None  # None: set by the config (synthetic.num_classes)
    needs_data_dir: bool


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(10, needs_data_dir=False),
    "mnist": DatasetSpec(10, needs_data_dir=True),
    "fmnist": DatasetSpec(10, needs_data_dir=True),
    "emnist": DatasetSpec(62, needs_data_dir=True),  # the byclass split
    "cifar10": DatasetSpec(10, needs_data_dir=True),
    "cifar100": DatasetSpec(100, needs_data_dir=True),
    "synthetic": DatasetSpec(None, needs_data_dir=False),
}


# -- algorithm settings ------------------------------------------------------------------------------------
# Each class is one algorithm's config section; ``validate`` checks it against the configured model
# and raises ConfigError naming ``section.key``. Upper bounds stop a typo (hidden_dim=1000000 asks for
# terabytes) at once instead of as an allocation error minutes later.

MAX_WIDTH = 4096
MAX_EPOCHS = 10_000


@dataclass
class HyperNetworkSettings:
    """pFedLA's per-client hypernetworks (``pfedla_frozen``: never trained, α stays at its start)."""

    embedding_dim: int = 32
    hidden_dim: int = 64
    heur_k: int = 0  # HeurpFedLA: layers each client keeps local per round (0: off)

    def validate(self, section: str, model: ModelSpec) -> None:
        require_range(self.embedding_dim, f"{section}.embedding_dim", 1, MAX_WIDTH)
        require_range(self.hidden_dim, f"{section}.hidden_dim", 1, MAX_WIDTH)
        require_range(self.heur_k, f"{section}.heur_k", 0, why="0 disables HeurpFedLA")
        # keeping every layer local would be Local training under pFedLA's name
        require(self.heur_k < model.layers, f"{section}.heur_k",
                f"the model has {model.layers} layers: keep at most {model.layers - 1} local, "
                f"got {self.heur_k}")


@dataclass
class PFedLASettings(HyperNetworkSettings):
    """pFedLA: the hypernetworks take plain gradient steps of size ``hn_lr`` on the scale-free
    surrogate (docs/study.md); 0 freezes them."""

    hn_lr: float = 3.0

    def validate(self, section: str, model: ModelSpec) -> None:
        super().validate(section, model)
        require_range(self.hn_lr, f"{section}.hn_lr", 0, why="0 freezes the hypernetworks")


@dataclass
class PFedHNSettings:
    """pFedHN: Adam on one model-generating hypernetwork and the client embeddings."""

    lr: float = 0.0003
    embedding_dim: int = 32
    hidden_dim: int = 64

    def validate(self, section: str, model: ModelSpec) -> None:
        require(self.lr > 0, f"{section}.lr", f"must be > 0, got {self.lr}")
        require_range(self.embedding_dim, f"{section}.embedding_dim", 1, MAX_WIDTH)
        require_range(self.hidden_dim, f"{section}.hidden_dim", 1, MAX_WIDTH)


@dataclass
class FedProxSettings:
    mu: float = 0.01  # weight of the proximal term (mu/2)·‖θ − θ_global‖²

    def validate(self, section: str, model: ModelSpec) -> None:
        require_range(self.mu, f"{section}.mu", 0, why="0: fedprox is fedavg")


@dataclass
class FineTuneSettings:
    finetune_epochs: int = 1  # local epochs on the global model before each evaluation

    def validate(self, section: str, model: ModelSpec) -> None:
        require_range(self.finetune_epochs, f"{section}.finetune_epochs", 0, MAX_EPOCHS,
                      why="0: fedavg_ft is fedavg")


def _check_head(personal_layers: int, key: str, model: ModelSpec) -> None:
    require(1 <= personal_layers < model.layers, key,
            f"the model has {model.layers} layers: keep between 1 and {model.layers - 1} on the clients, "
            f"got {personal_layers}")


@dataclass
class FedPerSettings:
    personal_layers: int = 1  # the last layers, the head, that stay on each client

    def validate(self, section: str, model: ModelSpec) -> None:
        _check_head(self.personal_layers, f"{section}.personal_layers", model)


@dataclass
class FedRepSettings:
    personal_layers: int = 1  # the last layers, the head, that stay on each client
    head_epochs: int = 2  # epochs on the head (body fixed) before the local epochs on the body

    def validate(self, section: str, model: ModelSpec) -> None:
        _check_head(self.personal_layers, f"{section}.personal_layers", model)
        require_range(self.head_epochs, f"{section}.head_epochs", 0, MAX_EPOCHS)


@dataclass
class DittoSettings:
    lam: float = 0.1  # λ of (λ/2)·‖v − w‖², pulling each personal model v toward the global model w

    def validate(self, section: str, model: ModelSpec) -> None:
        require_range(self.lam, f"{section}.lam", 0, why="0: personal models train like local")


# -- the algorithms ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AlgorithmSpec:
    """One algorithm: its name (also its config section's), how to build it, and its settings.

    ``build`` is ``"module:function"``; ``function(settings, context)`` returns the strategy. A
    training pod needs only its client rule: with ``default_client`` that is the default rule and
    the (possibly large) server state is never built.
    """

    name: str
    build: str
    settings: Any = None  # the section's defaults: an instance of a dataclass with validate(); None: none
    default_client: bool = False  # trains with the default ClientRule: pods need not build the server
    needs_norm_layers: bool = False  # keeps normalization layers local: needs a model that has them

    def default_settings(self) -> Any:
        """A fresh copy of the section's defaults (None without settings)."""
        return None if self.settings is None else dataclasses.replace(self.settings)


_ALGORITHMS: dict[str, AlgorithmSpec] = {}


def register(spec: AlgorithmSpec) -> AlgorithmSpec:
    """Add ``spec`` to the registry; a name that is taken is an error (config.py refuses one that is
    also a config key)."""
    if spec.name in _ALGORITHMS:
        raise ValueError(f"algorithm name {spec.name!r} is already taken")
    if not spec.name.isidentifier() or spec.name != spec.name.lower():
        raise ValueError(f"algorithm name {spec.name!r} must be a lower-case identifier")
    _ALGORITHMS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove an algorithm (for tests that register a toy one)."""
    del _ALGORITHMS[name]


def algorithm(name: str) -> AlgorithmSpec:
    """The registered algorithm ``name``; a ConfigError naming the known ones otherwise."""
    try:
        return _ALGORITHMS[name]
    except KeyError:
        raise ConfigError("algorithms", f"unknown algorithm {shown(name)}; known: {', '.join(_ALGORITHMS)}") \
            from None


def algorithm_names() -> tuple[str, ...]:
    """Every registered algorithm, in registration order."""
    return tuple(_ALGORITHMS)


def sections() -> dict[str, Any]:
    """Fresh default settings of every algorithm that has a section, by name."""
    return {name: spec.default_settings() for name, spec in _ALGORITHMS.items() if spec.settings is not None}


_PACKAGE = "pfedla.algorithms"
for _spec in (
    AlgorithmSpec("pfedla", f"{_PACKAGE}.pfedla:build", PFedLASettings(), default_client=True),
    AlgorithmSpec("pfedla_frozen", f"{_PACKAGE}.pfedla:build_frozen", HyperNetworkSettings(),
                  default_client=True),
    AlgorithmSpec("fedavg", f"{_PACKAGE}.fedavg:build"),
    AlgorithmSpec("fedavg_ft", f"{_PACKAGE}.fedavg_ft:build", FineTuneSettings()),
    AlgorithmSpec("fedprox", f"{_PACKAGE}.fedprox:build", FedProxSettings()),
    AlgorithmSpec("fedper", f"{_PACKAGE}.fedper:build", FedPerSettings()),
    AlgorithmSpec("fedrep", f"{_PACKAGE}.fedrep:build", FedRepSettings()),
    AlgorithmSpec("fedbn", f"{_PACKAGE}.fedbn:build", needs_norm_layers=True),
    AlgorithmSpec("ditto", f"{_PACKAGE}.ditto:build", DittoSettings()),
    AlgorithmSpec("pfedhn", f"{_PACKAGE}.pfedhn:build", PFedHNSettings(), default_client=True),
    AlgorithmSpec("local", f"{_PACKAGE}.local:build"),
):
    register(_spec)
