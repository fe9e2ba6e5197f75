"""Holds a kfp.local run's step outputs to the rules of the KFP 2.17 cluster backend.

kfp.local accepts outputs that the cluster rejects, so every pipeline test runs this on the
``executor_output.json`` files its run wrote. The rules, read in kubeflow/pipelines at tag
2.17.0 (backend/src/v2):

- ``component/launcher_v2.go`` parses the executor output with ``protojson.Unmarshal``: it is
  strict JSON, and a bare ``NaN``/``Infinity`` token (what Python's ``json.dumps`` writes for
  a float nan/inf) is a syntax error that fails the pod;
- ``metadata/converter.go`` turns artifact metadata into ML Metadata values and rejects
  ``null`` ("unknown/unsupported value type"), which also fails the pod. pfedla keeps
  artifact metadata flat: finite numbers, strings and booleans only;
- ``driver/resolve.go`` hands output parameters to consumers and refuses ``null`` and a
  string where another type was declared, so every output parameter must have the JSON type
  its component declares.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

DECLARED = {  # parameterType in the pipeline spec -> the JSON values it admits
    "STRING": (str,),
    "NUMBER_INTEGER": (int,),
    "NUMBER_DOUBLE": (int, float),
    "BOOLEAN": (bool,),
    "LIST": (list,),
    "STRUCT": (dict,),
}


class ContractViolation(AssertionError):
    """A step wrote something the cluster's launcher or driver would reject."""


def _refuse_constant(token: str) -> Any:
    raise ValueError(f"bare {token} token (protojson rejects it)")


def strict_load(path: Path) -> Any:
    """Parse like protojson: no NaN, Infinity or -Infinity tokens."""
    return json.loads(path.read_text(), parse_constant=_refuse_constant)


def output_types(compiled_yaml: Path) -> dict[str, dict[str, str]]:
    """Declared output parameter types per task folder name (component name without ``comp-``)."""
    spec = next(yaml.safe_load_all(compiled_yaml.read_text()))
    types = {}
    for name, component in spec["components"].items():
        parameters = component.get("outputDefinitions", {}).get("parameters", {})
        types[name.removeprefix("comp-")] = {k: v["parameterType"] for k, v in parameters.items()}
    return types


def _metadata_problems(where: str, metadata: Any) -> list[str]:
    if not isinstance(metadata, dict):
        return [f"{where}: metadata is {type(metadata).__name__}, not an object"]
    problems = []
    for key, value in metadata.items():
        if value is None:
            problems.append(f"{where}: metadata {key!r} is null")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{where}: metadata {key!r} is {value}")
        elif not isinstance(value, (str, bool, int, float)):
            problems.append(f"{where}: metadata {key!r} is a {type(value).__name__}, not a flat value")
    return problems


def check_executor_output(path: Path, declared: dict[str, str]) -> list[str]:
    """The problems one task's ``executor_output.json`` has (empty when the cluster accepts it)."""
    task = path.parent.name
    try:
        output = strict_load(path)
    except ValueError as error:
        return [f"{path}: not strict JSON: {error}"]
    problems = []
    for name, bundle in output.get("artifacts", {}).items():
        for artifact in bundle.get("artifacts", []):
            problems += _metadata_problems(f"{task}.{name}", artifact.get("metadata", {}))
    for name, value in output.get("parameterValues", {}).items():
        kind = declared.get(name)
        if kind is None:
            problems.append(f"{task}: output parameter {name!r} is not declared")
        elif value is None or isinstance(value, bool) and kind != "BOOLEAN" \
                or not isinstance(value, DECLARED[kind]):
            problems.append(f"{task}: output parameter {name!r} = {value!r} is not a {kind}")
    return problems


def assert_launcher_accepts(pipeline_root: Path, compiled_yaml: Path) -> int:
    """Check every executor output under ``pipeline_root``; returns how many there were."""
    types = output_types(compiled_yaml)
    outputs = sorted(Path(pipeline_root).rglob("executor_output.json"))
    if not outputs:
        raise ContractViolation(f"no executor_output.json under {pipeline_root}: nothing was checked")
    problems = [p for path in outputs for p in check_executor_output(path, _declared(types, path))]
    if problems:
        raise ContractViolation("the KFP 2.17 launcher would fail these steps:\n  " + "\n  ".join(problems))
    return len(outputs)


def _declared(types: dict[str, dict[str, str]], path: Path) -> dict[str, str]:
    task = path.parent.name
    if task not in types:
        raise ContractViolation(f"{path}: task {task!r} is not a component of the compiled pipeline")
    return types[task]
