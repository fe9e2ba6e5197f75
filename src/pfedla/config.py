"""One typed experiment config: YAML file + ``key=value`` overrides, validated before any work."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pfedla import registry
from pfedla.errors import ConfigError, has_userinfo, shown
from pfedla.registry import choice, require

PARTITIONS = ("iid", "dirichlet", "pathological")
DEVICES = ("auto", "cpu", "cuda")
LAST_BATCH_RULES = ("nominal", "mean", "drop")  # client.TrainSettings.last_batch says what each does
# Keys that were flat before each algorithm got its own section: refused with where they went, never
# read silently under the old name.
MOVED_KEYS = {
    "hn_lr": "pfedla.hn_lr",
    "pfedhn_lr": "pfedhn.lr",
    "embedding_dim": "pfedla.embedding_dim, pfedla_frozen.embedding_dim or pfedhn.embedding_dim",
    "hidden_dim": "pfedla.hidden_dim, pfedla_frozen.hidden_dim or pfedhn.hidden_dim",
    "heur_k": "pfedla.heur_k or pfedla_frozen.heur_k",
    "mu": "fedprox.mu",
    "finetune_epochs": "fedavg_ft.finetune_epochs",
    "personal_layers": "fedper.personal_layers or fedrep.personal_layers",
    "head_epochs": "fedrep.head_epochs",
    "ditto_lambda": "ditto.lam",
}


@dataclass
class PartitionConfig:
    """How the pooled dataset is split over clients."""

    kind: str = "pathological"
    classes_per_client: int = 2
    alpha: float = 0.5


@dataclass
class SyntheticConfig:
    """FedProx-style synthetic(alpha, beta) data: alpha varies models, beta varies inputs."""

    alpha: float = 1.0
    beta: float = 1.0
    dimension: int = 60
    num_classes: int = 10
    samples_per_client: int = 200


@dataclass
class PipelineConfig:
    """How ``pfedla pipeline`` turns the experiment into Kubeflow pipeline runs."""

    algorithm: str = "pfedla"
    image: str = ""  # empty: the step image built from images/ (pfedla.images.step_image)
    data_root: str | None = None  # where tensors live (s3:// on a cluster); None: a local dir for run-local
    parallelism: int = 10
    clients_per_pod: int = 1  # clients one client-training pod trains in turn
    rounds_per_run: int = 5  # rounds one pipeline run (segment) unrolls; docs/kubeflow.md "Long runs"
    start_round: int = 0
    resume_from: str | None = None  # a checkpoint folder; default: this experiment's own checkpoint
    keep_rounds: int = 1  # rounds of objects kept behind the newest (a retried server step needs 1)
    segment_timeout: int = 0  # seconds a segment (one pipeline run) may take, Pending pods included
    eval_every: int = 0  # 0: evaluate only at the end of the run
    gpus_per_client: int = 0
    gpu_resource: str = "nvidia.com/gpu"
    gpu_node_selector: str | None = None  # "label=value"
    cpu_request: str = "1"
    memory_request: str = "2Gi"
    client_retries: int = 2
    client_pod_timeout: int = 0  # seconds before Kubernetes kills a client pod (0: no limit)
    caching: bool = True
    mlflow_tracking_uri: str | None = None  # else MLFLOW_TRACKING_URI from the endpoints ConfigMap
    endpoints_config_map: str = "pfedla-endpoints"
    s3_secret: str = "pfedla-s3-credentials"
    mlflow_secret: str | None = None
    registered_model: str = "pfedla-personalized"
    service_account: str = "pfedla-pipeline-runner"  # least-privilege account, k8s/components/kfp-standalone


@dataclass
class ExperimentConfig:
    """Everything one experiment needs; docs/configuration.md describes each key."""

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    test_fraction: float = 0.25
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    clients: int = 20
    participation: float = 1.0
    rounds: int = 40
    local_epochs: int = 2
    batch_size: int = 32
    last_batch: str = "nominal"
    lr: float = 0.05
    model: str = "cnn"
    seed: int = 0
    seeds: list[int] | None = None  # the experiment once per seed; when set, `seed` is not used
    device: str = "auto"
    algorithms: list[str] = field(default_factory=lambda: ["pfedla", "fedavg", "local"])
    output_dir: str = "runs/default"
    eval_every: int = 1
    heatmap_every: int = 10
    experiment_name: str = "pfedla"
    checkpoint_dir: str | None = None  # default: <output_dir>/checkpoints/rounds; may be s3://
    keep_checkpoints: int = 3
    checkpoint_every: int = 1  # rounds between checkpoints (the last round is always checkpointed)
    max_failed_fraction: float = 0.5
    max_update_norm: float | None = None  # reject updates with a larger L2 norm (off by default)
    update_norm_ratio: float | None = 100.0  # reject updates this many times the others' median norm
    client_timeout: float | None = None  # seconds of local training per client and round (no limit)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    # Each algorithm's own section (``pfedla: {hn_lr: 3.0, ...}``), by algorithm name; in YAML and in
    # ``to_dict`` the sections are top-level keys. pfedla.registry defines them and their defaults.
    settings: dict[str, Any] = field(default_factory=registry.sections)

    def settings_of(self, algorithm: str) -> Any:
        """The settings section of ``algorithm`` (None for one without settings)."""
        return self.settings.get(algorithm)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as YAML would hold it: every algorithm's section is a top-level key."""
        tree = dataclasses.asdict(self)
        sections = tree.pop("settings")
        return {**tree, **sections}

    def to_json(self) -> str:
        """The config as the pipeline steps receive it (``steps.parse_config`` reads it back)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def flat_params(self) -> dict[str, str]:
        """The config as flat ``a.b -> str`` pairs, for MLflow params."""
        return {key: str(value) for key, value in _flatten(self.to_dict()).items()}


# Keys that change how an experiment is run, watched or stored, never its numbers: two configs
# that differ only here share an experiment key (and so the pipeline's data-plane prefix,
# checkpoints and MLflow run), which is what lets a longer `rounds` or another segmenting
# continue an experiment.
_NOT_IN_KEY = {"rounds", "device", "algorithms", "output_dir", "eval_every", "heatmap_every",
               "experiment_name", "checkpoint_dir", "keep_checkpoints", "checkpoint_every"}

MAX_SEEDS = 100
SEED_LIMIT = 2**32  # derive_seed keeps a seed's low 32 bits: larger seeds would repeat smaller ones


def run_seeds(config: ExperimentConfig) -> list[int]:
    """The seeds the experiment runs: ``seeds`` when set, else ``[seed]``."""
    return list(config.seeds) if config.seeds is not None else [config.seed]


def seed_config(config: ExperimentConfig, seed: int) -> ExperimentConfig:
    """The single-seed experiment that ``config`` runs for ``seed``: ``seed`` set, ``seeds`` unset."""
    return dataclasses.replace(config, seed=seed, seeds=None)


def single_seed(config: ExperimentConfig) -> ExperimentConfig:
    """``config`` as one single-seed experiment, for what runs one seed only (the pipeline);
    a ConfigError when ``seeds`` lists several."""
    seeds = run_seeds(config)
    if len(seeds) > 1:
        raise ConfigError("seeds", f"the pipeline runs one seed, got {len(seeds)} ({shown(seeds)}): run one "
                                   "pipeline per seed with seed=<s>, or use `pfedla run` for several")
    return seed_config(config, seeds[0])


def experiment_key(config: ExperimentConfig) -> str:
    """A short digest of everything that determines the experiment's numbers.

    A one-entry ``seeds`` is the same experiment as ``seed`` set to that entry (same key); several
    seeds make a key of their own, from the sorted seeds. Each seed's part of such an experiment
    is the single-seed experiment ``seed_config(config, s)``, with that one's key.
    """
    relevant = {k: v for k, v in config.to_dict().items()
                if k not in _NOT_IN_KEY | {"pipeline", "seed", "seeds"}}
    seeds = run_seeds(config)
    relevant["seed"] = seeds[0] if len(seeds) == 1 else sorted(seeds)
    relevant["pipeline.algorithm"] = config.pipeline.algorithm
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()
    return digest[:16]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (or the embedded defaults), apply ``key=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for override in overrides or []:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(override, "an override must look like key=value (e.g. rounds=10)")
        _set_dotted(raw, key.strip(), _parse_value(key, text))
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Build and validate a config from plain data; unknown keys are errors."""
    if not isinstance(raw, dict):
        raise ConfigError("<root>", f"expected a mapping of keys to values, got {type(raw).__name__}")
    sections = registry.sections()
    if clash := sorted(set(sections) & {f.name for f in fields(ExperimentConfig)}):
        raise ValueError(f"algorithms {clash} have the names of config keys")  # a registration mistake
    top = {key: value for key, value in raw.items() if key not in sections}
    for key in map(str, top):  # YAML keys may be numbers
        if key in MOVED_KEYS:
            raise ConfigError(key, f"each algorithm has its own section now: set {MOVED_KEYS[key]} "
                                   "(docs/configuration.md)")
        if key == "settings":
            raise ConfigError(key, "unknown key; each algorithm's settings are a top-level section named "
                                   f"after it: {', '.join(sections)}")
    config = _build(ExperimentConfig, top, prefix="")
    for name, defaults in sections.items():
        if name in raw:
            if not isinstance(raw[name], dict):
                raise ConfigError(name, "expected a section (mapping)")
            sections[name] = _build(type(defaults), raw[name], prefix=f"{name}.", defaults=defaults)
    config.settings = sections
    validate(config)
    return config


MAX_CONFIG_BYTES = 1 << 20  # a config is a few dozen keys; anything this large is a mistake or an attack
MAX_OVERRIDE_CHARS = 10_000


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError("--config", f"file not found: {path}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError("--config", f"{path} is {size} bytes; a config file may hold at most "
                                      f"{MAX_CONFIG_BYTES} bytes")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as error:  # ValueError: a 5000-digit int
        raise ConfigError("--config", f"{path} is not valid YAML: {str(error)[:500]}") from None
    except RecursionError:  # "[" * 100000: the parser recurses once per level
        raise ConfigError("--config", f"{path} is not valid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of keys to values")
    return data


def _parse_value(key: str, text: str) -> Any:
    if len(text) > MAX_OVERRIDE_CHARS:
        raise ConfigError(key, f"the value is {len(text)} characters; an override may hold at most "
                               f"{MAX_OVERRIDE_CHARS}")
    try:
        return yaml.safe_load(text) if text.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError):
        raise ConfigError(key, f"cannot parse value {shown(text)}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(dotted, f"'{part}' is not a section")
        node = child
    node[leaf] = value


def _build(cls: type, raw: dict[str, Any], prefix: str, defaults: Any = None) -> Any:
    """An instance of dataclass ``cls``: ``raw``'s values, checked, over ``defaults`` (else cls())."""
    known = {f.name: f for f in fields(cls) if f.name != "settings"}
    unknown = sorted(map(str, set(raw) - set(known)))  # YAML keys may be numbers
    if unknown:
        key = f"{prefix}{unknown[0]}"
        hint = f"known keys here: {', '.join(sorted(known))}"
        if not prefix:
            hint += f", and a section per algorithm ({', '.join(registry.sections())})"
        raise ConfigError(key, f"unknown key; {hint}")
    values: dict[str, Any] = {}
    defaults = cls() if defaults is None else defaults
    for name, spec in known.items():
        key = f"{prefix}{name}"
        if name not in raw:
            continue
        value = raw[name]
        default = getattr(defaults, name)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(key, "expected a section (mapping)")
            values[name] = _build(type(default), value, prefix=f"{key}.")
        else:
            values[name] = _coerce(key, value, spec)
    return dataclasses.replace(defaults, **values)


def _coerce(key: str, value: Any, spec: dataclasses.Field) -> Any:
    """Check ``value`` against the field's annotation (``int``, ``float | None``, ``list[str]``...)."""
    kind = str(spec.type).replace(" | None", "").strip()
    if value is None:
        if "None" in str(spec.type):
            return None
        raise ConfigError(key, "a value is required")
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {shown(value)}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {shown(value)}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {shown(value)}")
        if not math.isfinite(value):
            raise ConfigError(key, f"expected a finite number, got {shown(value)}")
        return float(value)
    if kind == "list[int]":
        if not isinstance(value, list) or not all(type(v) is int for v in value):  # bool is no seed
            raise ConfigError(key, f"expected a list of integers, got {shown(value)}")
        return list(value)
    if kind == "list[str]":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ConfigError(key, f"expected a list of names, got {shown(value)}")
        return list(items)
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {shown(value)}")
    return value


def num_classes_of(config: ExperimentConfig) -> int:
    """Number of classes of the configured dataset (known before loading it)."""
    known = registry.DATASETS[config.dataset].num_classes
    return config.synthetic.num_classes if known is None else known


# MLflow refuses longer experiment names (mlflow.utils.validation.MAX_EXPERIMENT_NAME_LENGTH).
MAX_EXPERIMENT_NAME_CHARS = 500
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")

INT32_MAX = 2**31 - 1

# Upper bounds of size-like keys: far above any experiment this simulator can hold, low enough that
# a typo fails here and not as an allocation error minutes later (hidden_dim=1000000 asks for N
# hidden x hidden matrices: terabytes) or a run that never ends. docs/configuration.md lists them.
MAXIMA = {
    "clients": 10_000,
    "rounds": 1_000_000,
    "local_epochs": 10_000,
    "batch_size": 1_000_000,
    "synthetic.dimension": 100_000,
    "synthetic.num_classes": 1_000,
    "synthetic.samples_per_client": 1_000_000,
    "pipeline.rounds_per_run": 1_000,
    # KFP compiles these into int32 fields (parallelism, retries, a pod's deadline, a run's
    # activeDeadlineSeconds) or a GPU limit; beyond them protobuf raises "Value out of range".
    "pipeline.parallelism": 10_000,
    "pipeline.client_retries": 100,
    "pipeline.gpus_per_client": 64,
    "pipeline.client_pod_timeout": INT32_MAX,
    "pipeline.segment_timeout": INT32_MAX,
}


def _value(config: ExperimentConfig, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _validate_experiment_name(name: str) -> None:
    require(bool(name), "experiment_name", "must not be empty")
    require(len(name) <= MAX_EXPERIMENT_NAME_CHARS, "experiment_name",
             f"is {len(name)} characters; MLflow allows at most {MAX_EXPERIMENT_NAME_CHARS}")
    # MLflow itself takes any character, but a NUL is refused by PostgreSQL-backed tracking servers
    # and a line break or escape sequence garbles every log and error line that shows the name.
    if control := _CONTROL_CHARACTER.search(name):
        raise ConfigError("experiment_name",
                          f"must not contain control characters, found {shown(control.group())}")


def validate(config: ExperimentConfig) -> None:
    """Check every value; raise ConfigError naming the first bad key and what is allowed."""
    choice(config.dataset, "dataset", tuple(registry.DATASETS))
    choice(config.partition.kind, "partition.kind", PARTITIONS)
    choice(config.model, "model", tuple(registry.MODELS))
    choice(config.device, "device", DEVICES)
    require(config.clients >= 2, "clients", f"need at least 2 clients, got {config.clients}")
    require(
        0.0 < config.participation <= 1.0,
        "participation",
        f"must be in (0, 1], got {config.participation}",
    )
    require(config.rounds >= 1, "rounds", f"must be >= 1, got {config.rounds}")
    require(config.local_epochs >= 1, "local_epochs", f"must be >= 1, got {config.local_epochs}")
    require(config.batch_size >= 1, "batch_size", f"must be >= 1, got {config.batch_size}")
    require(config.lr > 0, "lr", f"must be > 0, got {config.lr}")
    choice(config.last_batch, "last_batch", LAST_BATCH_RULES)
    require(
        0.0 < config.test_fraction < 1.0,
        "test_fraction",
        f"must be in (0, 1), got {config.test_fraction}",
    )
    require(config.eval_every >= 1, "eval_every", f"must be >= 1, got {config.eval_every}")
    require(config.heatmap_every >= 1, "heatmap_every", f"must be >= 1, got {config.heatmap_every}")
    require(bool(config.output_dir), "output_dir", "must not be empty")
    _validate_experiment_name(config.experiment_name)
    names = registry.algorithm_names()
    require(bool(config.algorithms), "algorithms", f"list at least one of: {', '.join(names)}")
    for name in config.algorithms:
        choice(name, "algorithms", names)
    require(
        len(set(config.algorithms)) == len(config.algorithms),
        "algorithms",
        f"each algorithm at most once, got {config.algorithms}",
    )
    part = config.partition
    require(part.alpha > 0, "partition.alpha", f"must be > 0, got {part.alpha}")
    classes = num_classes_of(config)
    require(
        1 <= part.classes_per_client <= classes,
        "partition.classes_per_client",
        f"must be between 1 and the dataset's {classes} classes, got {part.classes_per_client}",
    )
    syn = config.synthetic
    require(syn.alpha >= 0, "synthetic.alpha", f"must be >= 0, got {syn.alpha}")
    require(syn.beta >= 0, "synthetic.beta", f"must be >= 0, got {syn.beta}")
    require(syn.dimension >= 1, "synthetic.dimension", f"must be >= 1, got {syn.dimension}")
    require(syn.num_classes >= 2, "synthetic.num_classes", f"must be >= 2, got {syn.num_classes}")
    require(
        syn.samples_per_client >= 4,
        "synthetic.samples_per_client",
        f"must be >= 4 (each client needs train and test samples), got {syn.samples_per_client}",
    )
    for key, maximum in MAXIMA.items():
        value = _value(config, key)
        require(value <= maximum, key, f"must be at most {maximum}, got {value}")
    if registry.DATASETS[config.dataset].needs_data_dir:
        require(
            config.data_dir is not None,
            "data_dir",
            f"dataset {shown(config.dataset)} needs data_dir (a local directory or s3:// prefix)",
        )
    require(config.keep_checkpoints >= 1, "keep_checkpoints",
             f"must be >= 1, got {config.keep_checkpoints}")
    require(0.0 <= config.max_failed_fraction <= 1.0, "max_failed_fraction",
             f"must be in [0, 1], got {config.max_failed_fraction}")
    if config.client_timeout is not None:
        require(config.client_timeout > 0, "client_timeout",
                 f"must be > 0 seconds (or null for no limit), got {config.client_timeout}")
    if config.max_update_norm is not None:
        require(config.max_update_norm > 0, "max_update_norm",
                 f"must be > 0 (or null for no limit), got {config.max_update_norm}")
    if config.update_norm_ratio is not None:
        require(config.update_norm_ratio >= 1, "update_norm_ratio",
                 f"must be >= 1 (or null for no relative limit), got {config.update_norm_ratio}")
    require(config.checkpoint_every >= 1, "checkpoint_every",
             f"must be >= 1, got {config.checkpoint_every}")
    require(0 <= config.seed < SEED_LIMIT, "seed", f"must be in [0, {SEED_LIMIT - 1}], got {config.seed}")
    _validate_seeds(config.seeds)
    _refuse_credentials(config)
    _validate_pipeline(config)
    model = registry.MODELS[config.model]
    for name, settings in config.settings.items():
        settings.validate(name, model)
    for name in dict.fromkeys((*config.algorithms, config.pipeline.algorithm)):
        if registry.algorithm(name).needs_norm_layers:
            with_norm = [m for m, spec in registry.MODELS.items() if spec.norm_layers]
            require(model.norm_layers > 0, "model", f"{name} keeps normalization layers local: use model: "
                    f"{' or '.join(with_norm)} (got {config.model})")
    if config.dataset == "synthetic":
        vector = [m for m, spec in registry.MODELS.items() if not spec.images_only]
        require(not model.images_only, "model",
                f"the synthetic dataset is a vector task: use model: {' or '.join(vector)}")


def _refuse_credentials(config: ExperimentConfig) -> None:
    """No value may hold a URL with a user or password: the config is stored in run.json, MLflow
    params and the pipeline YAML. The message never repeats the value."""
    for key, value in _flatten(config.to_dict()).items():
        texts = value if isinstance(value, list) else [value]
        if not any(isinstance(text, str) and has_userinfo(text) for text in texts):
            continue
        if key == "pipeline.mlflow_tracking_uri":
            source = "the Secret named by pipeline.mlflow_secret (MLFLOW_TRACKING_USERNAME, _PASSWORD)"
        elif key.startswith("pipeline."):
            source = "the Secret named by pipeline.s3_secret (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
        else:
            source = "the environment (MLFLOW_TRACKING_USERNAME, _PASSWORD; AWS_ACCESS_KEY_ID, ...)"
        raise ConfigError(key, "holds a URL with a user name or password (user:password@host), which "
                               "run.json, MLflow and the pipeline YAML would store: credentials come from "
                               f"{source}")


def _validate_seeds(seeds: list[int] | None) -> None:
    if seeds is None:
        return
    require(bool(seeds), "seeds", "list at least one seed (or null to run `seed` alone)")
    require(len(seeds) <= MAX_SEEDS, "seeds", f"at most {MAX_SEEDS} seeds, got {len(seeds)}")
    require(all(0 <= s < SEED_LIMIT for s in seeds), "seeds",
             f"each seed must be in [0, {SEED_LIMIT - 1}], got {shown(seeds)}")
    require(len(set(seeds)) == len(seeds), "seeds", f"each seed at most once, got {shown(seeds)}")


_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_LABEL = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?=[-A-Za-z0-9_.]*$")


def _validate_pipeline(config: ExperimentConfig) -> None:
    pipe = config.pipeline
    choice(pipe.algorithm, "pipeline.algorithm", registry.algorithm_names())
    for key in ("parallelism", "rounds_per_run", "clients_per_pod", "keep_rounds"):
        value = getattr(pipe, key)
        require(value >= 1, f"pipeline.{key}", f"must be >= 1, got {value}")
    for key in ("start_round", "eval_every", "gpus_per_client", "client_retries", "client_pod_timeout",
                "segment_timeout"):
        value = getattr(pipe, key)
        require(value >= 0, f"pipeline.{key}", f"must be >= 0, got {value}")
    require(
        pipe.start_round < config.rounds,
        "pipeline.start_round",
        f"must be below rounds ({config.rounds}), got {pipe.start_round}",
    )
    for key in ("data_root", "resume_from"):
        value = getattr(pipe, key)
        require(value is None or bool(value.strip()), f"pipeline.{key}", "must not be empty (use null)")
    for key in ("cpu_request", "memory_request"):
        value = getattr(pipe, key)
        require(bool(_QUANTITY.match(value)), f"pipeline.{key}",
                 f"not a Kubernetes quantity: {shown(value)} (e.g. 500m, 2, 4Gi)")
    if pipe.gpu_node_selector is not None:
        require(bool(_LABEL.match(pipe.gpu_node_selector)), "pipeline.gpu_node_selector",
                 f"expected label=value, got {shown(pipe.gpu_node_selector)}")
    require(bool(pipe.registered_model), "pipeline.registered_model", "must not be empty")
