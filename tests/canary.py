"""Canary credentials for the secrets tests (issue 21, cases 5-7): a password planted in every place
pfedla accepts a URL, and the commands that read a config."""

import socket
from pathlib import Path

CANARY = "canary-7f3e9b"
# Every config key that takes a URL or a location, with the canary in its user info.
CONFIG_URLS = {
    "pipeline.mlflow_tracking_uri": f"http://alice:{CANARY}@mlflow.example:5000",
    "pipeline.data_root": f"s3://key:{CANARY}@pfedla/data",
    "pipeline.resume_from": f"s3://key:{CANARY}@pfedla/checkpoints",
    "pipeline.image": f"https://bob:{CANARY}@registry.example/pfedla:1",
    "data_dir": f"s3://key:{CANARY}@bucket/mnist",
    "checkpoint_dir": f"s3://key:{CANARY}@bucket/checkpoints",
    "experiment_name": f"see http://carol:{CANARY}@wiki.example/page",
}


def dead_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def config_commands(tmp_path: Path, key: str) -> dict[str, list[str]]:
    """Every command that reads a config, with where it would write (``key`` not set otherwise)."""
    data_root = [] if key == "pipeline.data_root" else ["--set", "pipeline.data_root=s3://pfedla"]
    return {"run": ["run", "--quiet", "--set", "clients=2", "--set", "rounds=1", "--set",
                    "algorithms=[local]", "--set", f"output_dir={tmp_path / 'out'}"],
            "compile": ["pipeline", "compile", *data_root, "-o", str(tmp_path / "pipeline.yaml")]}


def nested(dotted: str, value: str) -> dict:
    """``{"a": {"b": value}}`` for ``"a.b"``: a dotted key as a config file writes it."""
    *parents, leaf = dotted.split(".")
    tree: dict = {leaf: value}
    for part in reversed(parents):
        tree = {part: tree}
    return tree
