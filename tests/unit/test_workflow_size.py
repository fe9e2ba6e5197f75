"""The size model of a run on a KFP 2.17 / Argo v4.0.5 cluster (pfedla.workflow_size), on small pipelines
compiled here with the real KFP compiler. No cluster runs here: the model stands in for the driver's and
Argo's string building, whose shapes its constants cite."""

import json

import pytest
import yaml
from kfp import compiler, dsl

from pfedla.workflow_size import (
    MAX_ENV_VAR_LEN,
    MAX_WORKFLOW_SIZE,
    WorkflowSize,
    escaped_len,
    estimate,
    go_json,
    pod_problem,
    rounds_that_fit,
    workflow_budget,
    workflow_problem,
)


@dsl.component(base_image="python:3.11")
def train(item: str, update: dsl.Output[dsl.Artifact]):
    update.metadata["item"] = item


@dsl.component(base_image="python:3.11")
def aggregate(updates: dsl.Input[list[dsl.Artifact]]):
    print(len(updates))


@dsl.component(base_image="python:3.11")
def aggregate_after(round_idx: int):
    print(round_idx)


def compiled(tmp_path, pods: int, collected: bool):
    """A round of ``pods`` training pods whose server step collects their artifacts, or runs after them."""
    @dsl.pipeline(name="fan-in")
    def pipeline():
        with dsl.ParallelFor([str(i) for i in range(pods)]) as item:
            task = train(item=item)
        if collected:
            aggregate(updates=dsl.Collected(task.outputs["update"]))
        else:
            aggregate_after(round_idx=0).after(task)

    path = tmp_path / f"fan-in-{pods}-{collected}.yaml"
    compiler.Compiler().compile(pipeline, str(path))
    return list(yaml.safe_load_all(path.read_text()))


def server(sizes):
    (pod,) = [pod for pod in sizes.pods if pod.task.startswith("aggregate")]
    return pod


def test_a_collected_fan_in_grows_the_server_pods_argo_template_past_argos_limit(tmp_path):
    """The issue's finding 3, in the model: each collected artifact (URI, the producer's metadata, the
    store's session info, escaped twice) adds 1 to 1.5 KB to the server pod's ARGO_TEMPLATE; 150 of them
    pass 128 KiB."""
    small, large = (estimate(compiled(tmp_path, pods, collected=True)) for pods in (10, 150))
    per_artifact = (server(large).argo_template - server(small).argo_template) / 140
    assert 900 < per_artifact < 1600
    assert server(large).argo_template > MAX_ENV_VAR_LEN
    assert "ARGO_TEMPLATE" in pod_problem(large) and "MAX_ENV_VAR_LEN of 131072" in pod_problem(large)
    assert pod_problem(small) is None


def test_listing_keeps_the_server_pod_the_same_whatever_the_rounds_pods(tmp_path):
    small, large = (estimate(compiled(tmp_path, pods, collected=False)) for pods in (10, 150))
    assert server(small) == server(large)
    assert pod_problem(large) is None
    # the Workflow still grows with every pod, by twelve nodes (KFP's compiled-workflows/
    # parallel_for_after_dependency.yaml): the iteration's DAG, its item driver and item DAG, the step's
    # driver, executor DAG and pod, each under a Retry node (every template has a retry strategy)
    per_pod_nodes = (large.workflow.nodes - small.workflow.nodes) / 140
    assert per_pod_nodes == 12
    assert large.workflow.compressed < large.workflow.uncompressed


def test_strings_are_escaped_as_go_marshals_them():
    assert go_json({"a": "<&>", "b": [1, True]}) == '{"a":"\\u003c\\u0026\\u003e","b":[1,true]}'
    inner = go_json({"k": 'say "hi"'})
    assert escaped_len(inner) == len(inner) + inner.count('"') + inner.count("\\")  # each gets a backslash
    assert escaped_len(json.dumps(inner)) > escaped_len(inner)


def _workflow(compressed: int) -> WorkflowSize:
    return WorkflowSize(nodes=1, spec=compressed // 4, status=10 * compressed, status_packed=compressed // 2,
                        other=compressed - compressed // 4 - compressed // 2)


def test_argo_compresses_only_a_workflow_past_its_limit_and_the_budget_is_a_share_of_it():
    small = WorkflowSize(nodes=1, spec=1000, status=2000, status_packed=100, other=10)
    assert small.stored == small.uncompressed == 3010 and small.compressed == 1110
    big = _workflow(800_000)
    assert big.compressed == 800_000 and big.stored == big.compressed
    assert workflow_budget() == int(0.6 * MAX_WORKFLOW_SIZE)
    assert workflow_problem(_workflow(workflow_budget())) is None
    assert "past 60% of MAX_WORKFLOW_SIZE" in workflow_problem(_workflow(workflow_budget() + 1))


@pytest.mark.parametrize("one_round, per_round, rounds, expected", [
    (100_000, 50_000, 20, 1 + (workflow_budget() - 100_000) // 50_000),
    (workflow_budget(), 50_000, 20, 1),
    (workflow_budget() + 1, 50_000, 20, 0),
    (100_000, 0, 1, 1),
])
def test_the_rounds_that_fit_follow_the_linear_growth_of_a_segment(one_round, per_round, rounds, expected):
    fits = rounds_that_fit(_workflow(one_round), _workflow(one_round + per_round * (rounds - 1)), rounds)
    assert fits == expected
    if fits and per_round:
        assert one_round + per_round * (fits - 1) <= workflow_budget() < one_round + per_round * fits
