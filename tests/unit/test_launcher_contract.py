"""The launcher-contract helper itself: it must catch what the KFP 2.17 cluster backend rejects."""

import json

import pytest

from launcher_contract import ContractViolation, assert_launcher_accepts, check_executor_output

DECLARED = {"Output": "STRING"}


def output_file(tmp_path, text):
    path = tmp_path / "client-train" / "executor_output.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def artifact(metadata):
    entry = {"name": "update", "uri": "/x", "metadata": metadata}
    return json.dumps({"artifacts": {"update": {"artifacts": [entry]}}})


@pytest.mark.parametrize("text, problem", [
    (artifact({"train_loss": None}), "metadata 'train_loss' is null"),
    ('{"artifacts": {"update": {"artifacts": [{"metadata": {"train_loss": NaN}}]}}}', "not strict JSON"),
    ('{"parameterValues": {"Output": Infinity}}', "not strict JSON"),
    (artifact({"shape": [1, 8, 8]}), "is a list, not a flat value"),
    ('{"parameterValues": {"Output": null}}', "'Output' = None is not a STRING"),
    ('{"parameterValues": {"Output": 3}}', "'Output' = 3 is not a STRING"),
    ('{"parameterValues": {"Other": "x"}}', "'Other' is not declared"),
])
def test_outputs_the_cluster_rejects_are_reported(tmp_path, text, problem):
    problems = check_executor_output(output_file(tmp_path, text), DECLARED)
    assert any(problem in p for p in problems), problems


def test_outputs_the_cluster_accepts_pass(tmp_path):
    text = artifact({"a": 1, "b": 0.5, "c": "x", "d": True, "non_finite": "train_loss"})
    assert check_executor_output(output_file(tmp_path, text), DECLARED) == []


def test_a_run_with_nothing_to_check_or_an_unknown_task_fails(tmp_path):
    compiled = tmp_path / "p.yaml"
    compiled.write_text("components:\n  comp-record:\n    outputDefinitions:\n      parameters:\n"
                        "        Output:\n          parameterType: STRING\n")
    with pytest.raises(ContractViolation, match="nothing was checked"):
        assert_launcher_accepts(tmp_path / "root", compiled)
    output_file(tmp_path / "root", "{}")
    with pytest.raises(ContractViolation, match="'client-train' is not a component"):
        assert_launcher_accepts(tmp_path / "root", compiled)
