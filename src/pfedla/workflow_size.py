"""How big a compiled pipeline gets on a Kubeflow Pipelines 2.17 cluster (Argo Workflows v4.0.5).

A cluster refuses a run in two places that the size of the compiled YAML does not show:

- **A pod's ``ARGO_TEMPLATE``.** KFP's driver writes a step's executor input (its parameter values
  and every input artifact with its URI and metadata) into the pod spec patch of the step's pod.
  Argo puts the resolved template, patch included and so JSON-escaped twice, into the variable
  ``ARGO_TEMPLATE`` of the pod's init containers; longer than ``MAX_ENV_VAR_LEN`` it moves it into a
  ConfigMap, which the workflow controller's role may not create, so the pod is never created. The
  launcher then hands the executor input to the step as one argument (``MAX_ARG_STRLEN``).
- **The Workflow object.** Argo keeps the spec and every node's status, inputs and outputs
  included (each pod spec patch six times), in one object. Past ``MAX_WORKFLOW_SIZE`` it compresses
  the node status; when that is still too big, the run fails.

:func:`estimate` walks the compiled pipeline spec the way KFP's driver and compiler do: every task
the run executes (loop iterations included, with their items, collected artifacts counted), and
for each pod the strings the driver and Argo build, from the component and task specs in the YAML
and the shapes below. The node status is built the same way, node by node, with random ids and
timestamps of the real lengths, and compressed as Argo does to measure it. What it cannot know is
modelled by named constants (an artifact's metadata, the platform's names): each is read in
kubeflow/pipelines 2.17.0 (``backend/src/v2``, ``test_data/compiled-workflows``) or
argoproj/argo-workflows v4.0.5, as its comment says. docs/kubeflow.md gives the model's limits.
"""

from __future__ import annotations

import base64
import gzip
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# -- the limits ---------------------------------------------------------------------------------------------
# argo workflow/common/common.go:280 (MaxEnvVarLen); workflowpod.go:486-536 offloads a longer ARGO_TEMPLATE
MAX_ENV_VAR_LEN = 131_072
# Linux MAX_ARG_STRLEN (32 pages): the longest single argument; the launcher passes the executor input as one
MAX_ARG_STRLEN = 131_072
# argo workflow/packer/packer.go:15-23: the controller's MAX_WORKFLOW_SIZE, 1 MiB unless set (KFP does not)
MAX_WORKFLOW_SIZE = 1_048_576
# compile refuses a Workflow estimated above this share of MAX_WORKFLOW_SIZE: the compression ratio is
# measured on the model's node status, not on a cluster's, and retried pods add nodes
WORKFLOW_SHARE = 0.6

# -- what KFP 2.17's driver writes into a pod ---------------------------------------------------------------
# The pipeline root of a multi-user profile (pipelines-profile-controller/sync.py), longer than the
# standalone default minio://mlpipeline/v2/artifacts (backend/src/v2/config/env.go:38)
PIPELINE_ROOT = "minio://mlpipeline/private-artifacts/kubeflow-user-example-com/v2/artifacts"
# Each input artifact carries the object store's session info as metadata (metadata/client.go:1243-1250,
# the default of config/env.go:177-193, json.Marshal'ed with sorted keys)
SESSION_INFO = {"Params": {"accessKeyKey": "accesskey", "disableSSL": "true",
                           "endpoint": "seaweedfs.kubeflow:9000",
                           "fromEnv": "false", "maxRetries": "5", "region": "minio",
                           "secretKeyKey": "secretkey", "secretName": "mlpipeline-minio-artifact"},
                "Provider": "minio"}
# The producer's own metadata on an input artifact: pfedla's step summaries are flat and short
# (round, clients, losses, bytes moved; evaluate's, with its accuracy metrics, is the longest)
PRODUCER_METADATA_BYTES = 512
# A parameter that another task outputs: not known when compiling (pfedla passes none)
UNKNOWN_PARAMETER_BYTES = 256
MLMD_ID_DIGITS = 7
LAUNCHER_SERVERS = ("ml-pipeline.kubeflow", "8887", "metadata-grpc-service.kubeflow", "8080")  # config/env.go

# -- what Argo v4.0.5 adds to the template of a pod and to the Workflow object ------------------------------
# system-container-impl as KFP 2.17 compiles it
# (test_data/compiled-workflows/parallel_for_after_dependency.yaml, json.Marshal'ed), without podSpecPatch,
# its metadata and its inputs
IMPL_TEMPLATE_BYTES = 1_745
# The retry default pfedla's install sets on every template (k8s/components/kfp-standalone)
TEMPLATE_RETRY = {"limit": "2", "retryPolicy": "Always",
                  "expression": 'lastRetry.status == "Error" or lastRetry.exitCode != "-1"'}
# archiveLocation from KFP's artifact repository (manifests/kustomize/third-party/argo: keyFormat
# private-artifacts/{{workflow.namespace}}/{{workflow.name}}/{{workflow.creationTimestamp.Y}}/...)
ARCHIVE_LOCATION = {"archiveLogs": True, "s3": {
    "accessKeySecret": {"key": "accesskey", "name": "mlpipeline-minio-artifact"}, "bucket": "mlpipeline",
    "endpoint": "seaweedfs.kubeflow:9000", "insecure": True,
    "key": "private-artifacts/kubeflow-user-example-com/WORKFLOW/2026/08/21/"
           "WORKFLOW-system-container-impl-0000000000",
    "secretKeySecret": {"key": "secretkey", "name": "mlpipeline-minio-artifact"}}}
# The Workflow spec's fixed part: the system-container-{driver,executor,impl}, system-dag-driver and
# entrypoint templates and the spec's other fields (parallel_for_after_dependency.yaml: 7,221 + 282 bytes)
SPEC_FIXED_BYTES = 7_503
SPEC_VARIANT_BYTES = 2_300     # one more impl + executor template pair per pod metadata / retry variant
SPEC_CONTAINER_TASK_BYTES = 1_000  # a container task's driver and executor entries in its DAG template
SPEC_DAG_TASK_BYTES = 750      # a sub-DAG's driver and DAG entries
SPEC_LOOP_BYTES = 2_300        # a loop's entry, its iterator and iteration templates
SPEC_DAG_TEMPLATE_BYTES = 150
SPEC_ARGUMENT_BYTES = 40       # name and punctuation of one spec.arguments entry
WORKFLOW_METADATA_BYTES = 3_072  # labels, annotations, managedFields (status is atomic: one entry)
STATUS_FIXED_BYTES = 1_024     # phase, times, conditions, artifact repository, resources
TASK_RESULT_BYTES = 40         # status.taskResultsCompletionStatus: one entry per pod node, never compressed
HOSTS = tuple(f"{n:04x}" for n in range(16))  # the cluster nodes pods run on


def go_json(value: Any) -> str:
    """``value`` as Go's json.Marshal writes it: compact, with <, > and & escaped."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def escaped_len(text: str) -> int:
    """Bytes of ``text`` as a JSON string value, quotes excluded."""
    return len(go_json(text)) - 2


@dataclass(frozen=True)
class PodSize:
    """One pod the run starts: where it is, and the two strings that must stay under their limits."""

    task: str  # e.g. fl-round-3/for-loop-1[14]/client-train-3
    executor_input: int
    argo_template: int


@dataclass(frozen=True)
class WorkflowSize:
    """The Workflow object when the run has finished."""

    nodes: int
    spec: int
    status: int  # status.nodes as JSON
    status_packed: int  # gzip + base64, as Argo stores it once the object passes MAX_WORKFLOW_SIZE
    other: int  # metadata and the rest of the status

    @property
    def uncompressed(self) -> int:
        return self.spec + self.status + self.other

    @property
    def compressed(self) -> int:
        """The object with its node status compressed, as Argo writes it past MAX_WORKFLOW_SIZE."""
        return self.spec + self.status_packed + self.other

    @property
    def stored(self) -> int:
        """What Argo writes: node status compressed only when the whole object is too big otherwise."""
        return self.uncompressed if self.uncompressed <= MAX_WORKFLOW_SIZE else self.compressed


@dataclass(frozen=True)
class Estimate:
    pods: list[PodSize]
    workflow: WorkflowSize

    def largest(self, attribute: str) -> PodSize:
        return max(self.pods, key=lambda pod: getattr(pod, attribute))

    def report(self) -> list[str]:
        """The estimate in lines for people: the largest pod strings and the Workflow object."""
        template, executor_input, workflow = self.largest("argo_template"), self.largest("executor_input"), \
            self.workflow
        return [
            f"largest pod strings: ARGO_TEMPLATE {_kib(template.argo_template)} ({template.task}), executor "
            f"input {_kib(executor_input.executor_input)} ({executor_input.task}); limit "
            f"{_kib(MAX_ENV_VAR_LEN)} each",
            f"Workflow estimate, {len(self.pods)} pods and {workflow.nodes} nodes: "
            f"spec {_kib(workflow.spec)}, "
            f"node status {_kib(workflow.status)}; the object {_kib(workflow.uncompressed)} before Argo's "
            f"compression, {_kib(workflow.compressed)} after; refused past {_kib(workflow_budget())} "
            f"({WORKFLOW_SHARE:.0%} of MAX_WORKFLOW_SIZE {_kib(MAX_WORKFLOW_SIZE)})",
        ]


def _kib(size: int) -> str:
    return f"{size / 1024:,.0f} KiB"


def workflow_budget() -> int:
    """The most the compressed Workflow may be estimated at: a share of MAX_WORKFLOW_SIZE."""
    return int(WORKFLOW_SHARE * MAX_WORKFLOW_SIZE)


def pod_problem(sizes: Estimate) -> str | None:
    """Why a pod of the run would not start (its ARGO_TEMPLATE or executor input too long), or None."""
    template, executor_input = sizes.largest("argo_template"), sizes.largest("executor_input")
    if template.argo_template > MAX_ENV_VAR_LEN:
        return (f"the pod {template.task} would get an ARGO_TEMPLATE of {template.argo_template} bytes, over "
                f"Argo's MAX_ENV_VAR_LEN of {MAX_ENV_VAR_LEN}, and its pod would never be created")
    if executor_input.executor_input > MAX_ARG_STRLEN:
        return (f"the pod {executor_input.task} would get an executor input of "
                f"{executor_input.executor_input} bytes, over Linux's MAX_ARG_STRLEN of {MAX_ARG_STRLEN}, "
                "and its step could not start")
    return None


def workflow_problem(workflow: WorkflowSize) -> str | None:
    """Why the run's Workflow object is too big to risk (past the budget once compressed), or None."""
    if workflow.compressed <= workflow_budget():
        return None
    return (f"is estimated at {_kib(workflow.compressed)} after Argo's compression, past "
            f"{WORKFLOW_SHARE:.0%} of MAX_WORKFLOW_SIZE ({_kib(workflow_budget())})")


def rounds_that_fit(one_round: WorkflowSize, segment: WorkflowSize, rounds: int) -> int:
    """How many rounds a segment may hold within the budget, from the estimates of a segment of one round
    and of ``rounds`` rounds: each round adds the same nodes, so the compressed size grows linearly."""
    budget = workflow_budget()
    if one_round.compressed > budget:
        return 0
    if rounds == 1:
        return 1
    per_round = (segment.compressed - one_round.compressed) / (rounds - 1)
    return 1 + int((budget - one_round.compressed) // per_round)


# -- walking the compiled spec as the run executes it -------------------------------------------------------

@dataclass
class _Scope:
    """A DAG being executed: its node name, its input parameters' values and artifact counts."""

    node: str
    label: str
    parameters: dict[str, Any]
    artifacts: dict[str, int]


@dataclass
class _Task:
    kind: str  # container | dag | loop
    name: str
    spec: dict[str, Any]
    component: dict[str, Any]
    scope: _Scope
    parameters: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, int] = field(default_factory=dict)
    items: list[Any] = field(default_factory=list)


def _resolve_parameters(task: dict[str, Any], scope: _Scope) -> dict[str, Any]:
    values = {}
    for name, source in task.get("inputs", {}).get("parameters", {}).items():
        if "runtimeValue" in source:
            values[name] = source["runtimeValue"].get("constant")
        elif "componentInputParameter" in source:
            values[name] = scope.parameters.get(source["componentInputParameter"])
        else:
            values[name] = "x" * UNKNOWN_PARAMETER_BYTES
    return values


def _items(task: dict[str, Any], parameters: dict[str, Any]) -> list[Any]:
    items = task["parameterIterator"]["items"]
    if "raw" in items:
        return json.loads(items["raw"])
    return list(parameters.get(items["inputParameter"]) or [])


def _walk(ir: dict[str, Any], component: dict[str, Any], scope: _Scope) -> Iterator[_Task]:
    """Every task of ``component``'s DAG and below, in the order of its spec."""
    tasks = component["dag"]["tasks"]
    loop_sizes = {name: len(_items(t, _resolve_parameters(t, scope))) for name, t in tasks.items()
                  if "parameterIterator" in t}
    for name, task in tasks.items():
        child = ir["components"][task["componentRef"]["name"]]
        parameters = _resolve_parameters(task, scope)
        artifacts = {}
        for input_name, source in task.get("inputs", {}).get("artifacts", {}).items():
            if "componentInputArtifact" in source:
                artifacts[input_name] = scope.artifacts.get(source["componentInputArtifact"], 1)
            else:  # a loop's outputs are collected: one artifact per iteration
                artifacts[input_name] = loop_sizes.get(source["taskOutputArtifact"]["producerTask"], 1)
        if "parameterIterator" in task:
            items = _items(task, parameters)
            yield _Task("loop", name, task, child, scope, parameters, artifacts, items)
            item_input = task["parameterIterator"]["itemInput"]
            for index, item in enumerate(items):
                inner = _Scope(f"{scope.node}.{name}.iteration-iterations({index}:{index}).iteration-item",
                               f"{scope.label}{name}[{index}]/", {**parameters, item_input: item}, artifacts)
                yield from _walk(ir, child, inner)
        elif "dag" in child:
            yield _Task("dag", name, task, child, scope, parameters, artifacts)
            yield from _walk(ir, child, _Scope(f"{scope.node}.{name}", f"{scope.label}{name}/", parameters,
                                               artifacts))
        else:
            yield _Task("container", name, task, child, scope, parameters, artifacts)


# -- one pod: executor input, pod spec patch, ARGO_TEMPLATE -------------------------------------------------

class _Ids:
    """Random values of the lengths a real run has (ids, UUIDs, times): they set how well status
    compresses."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def digits(self, count: int) -> str:
        return str(self.rng.randrange(10 ** (count - 1), 10**count))

    def uuid(self) -> str:
        hexes = f"{self.rng.getrandbits(128):032x}"
        return f"{hexes[:8]}-{hexes[8:12]}-{hexes[12:16]}-{hexes[16:20]}-{hexes[20:]}"

    def time(self) -> str:
        hours, minutes, seconds = self.rng.randrange(24), self.rng.randrange(60), self.rng.randrange(60)
        return f"2026-08-21T{hours:02d}:{minutes:02d}:{seconds:02d}Z"


@dataclass
class _Run:
    ir: dict[str, Any]
    kubernetes: dict[str, Any]
    pipeline: str
    run_id: str
    workflow: str
    ids: _Ids

    def artifact_uri(self, task: str, name: str) -> str:
        # backend/src/v2/driver/driver.go:775-787: <root>/<pipeline>/<run>/<task>/<uuid>/<output>
        return f"{PIPELINE_ROOT}/{self.pipeline}/{self.run_id}/{task}/{self.ids.uuid()}/{name}"

    def input_artifact(self, name: str) -> dict[str, Any]:
        # metadata/converter.go:181-221 of the MLMD artifact; schema empty (metadata/client.go:1144)
        metadata = {"display_name": name, "producer": "x" * PRODUCER_METADATA_BYTES,
                    "store_session_info": go_json(SESSION_INFO)}
        return {"name": self.ids.digits(MLMD_ID_DIGITS), "type": {"instanceSchema": ""},
                "uri": self.artifact_uri("producer-task", name), "metadata": metadata}

    def executor_input(self, task: _Task) -> dict[str, Any]:
        """driver/container.go:79-123 with resolve.go (inputs) and driver.go:741-810 (outputs)."""
        outputs = task.component.get("outputDefinitions", {})
        artifacts = {name: {"artifacts": [{"name": name, "type": spec["artifactType"],
                                           "uri": self.artifact_uri(task.name, name), "metadata": {}}]}
                     for name, spec in outputs.get("artifacts", {}).items()}
        artifacts["executor-logs"] = {"artifacts": [{
            "name": "executor-logs", "type": {"schemaTitle": "system.Artifact", "schemaVersion": "0.0.1"},
            "uri": self.artifact_uri(task.name, "executor-logs-0")}]}
        folder = f"/tmp/kfp_outputs/{self.pipeline}/{self.run_id}/{task.name}/{self.ids.uuid()}"
        return {"inputs": {"parameterValues": task.parameters,
                           "artifacts": {name: {"artifacts": [self.input_artifact(name)
                                                              for _ in range(count)]}
                                         for name, count in task.artifacts.items()}},
                "outputs": {"parameters": {name: {"outputFile": f"{folder}/{name}"}
                                           for name in outputs.get("parameters", {})},
                            "artifacts": artifacts, "outputFile": f"{folder}/output_metadata.json"}}

    def executor(self, task: _Task) -> tuple[dict[str, Any], dict[str, Any]]:
        label = task.component["executorLabel"]
        return self.ir["deploymentSpec"]["executors"][label]["container"], self.kubernetes.get(label, {})

    def pod_spec_patch(self, task: _Task, executor_input: str) -> str:
        """driver.go:320-461 (the launcher's command before the user's) and k8s.go (env, tolerations)."""
        container, platform = self.executor(task)
        server, server_port, mlmd, mlmd_port = LAUNCHER_SERVERS
        command = ["/kfp-launcher/launch", "--pipeline_name", self.pipeline, "--run_id", self.run_id,
                   "--execution_id", self.ids.digits(MLMD_ID_DIGITS), "--executor_input", executor_input,
                   "--component_spec", go_json(task.component), "--pod_name", "$(KFP_POD_NAME)",
                   "--pod_uid", "$(KFP_POD_UID)", "--ml_pipeline_server_address", server,
                   "--ml_pipeline_server_port", server_port, "--mlmd_server_address", mlmd,
                   "--mlmd_server_port", mlmd_port, "--publish_logs", "true", "--publish_logs", "true", "--"]
        env = [{"name": e["envVar"], "valueFrom": {"configMapKeyRef": {"key": e["configMapKey"],
                                                                       "name": source["configMapName"]}}}
               for source in platform.get("configMapAsEnv", []) for e in source["keyToEnv"]]
        env += [{"name": e["envVar"], "valueFrom": {"secretKeyRef": {"key": e["secretKey"],
                                                                     "name": source["secretName"]}}}
                for source in platform.get("secretAsEnv", []) for e in source["keyToEnv"]]
        resources = container.get("resources", {})
        requests = {"cpu": resources.get("resourceCpuRequest", ""),
                    "memory": resources.get("resourceMemoryRequest", "")}
        limits = {}
        if accelerator := resources.get("accelerator"):
            limits[accelerator.get("resourceType", "")] = accelerator.get("resourceCount", "")
        main = {"args": container.get("command", []) + container.get("args", []), "command": command,
                "env": env, "image": container["image"], "name": "main",
                "resources": {"limits": limits, "requests": requests}}
        patch: dict[str, Any] = {"containers": [main]}
        for key in ("tolerations", "nodeSelector", "activeDeadlineSeconds"):
            if key in platform:
                patch[key] = platform[key]
        return go_json(patch)

    def argo_template(self, task: _Task, patch: str) -> int:
        """workflowpod.go:332-370: the resolved impl template, its inputs dropped, the patch filled in."""
        _, platform = self.executor(task)
        metadata = {"annotations": {"pipelines.kubeflow.org/runtime-role": "launcher"},
                    "labels": platform.get("podMetadata", {}).get("labels", {})}
        retry = dict(TEMPLATE_RETRY)
        if policy := task.spec.get("retryPolicy"):
            retry.update({"limit": str(policy.get("maxRetryCount", 0)), "backoff": {
                "duration": policy.get("backoffDuration", ""),
                "factor": str(int(policy.get("backoffFactor", 2))),
                "maxDuration": policy.get("backoffMaxDuration", "")}})
        added = {"metadata": metadata, "retryStrategy": retry, "podSpecPatch": patch,
                 "archiveLocation": ARCHIVE_LOCATION}
        return IMPL_TEMPLATE_BYTES + len(go_json(added)) - 2  # the object's braces are already counted


# -- the Workflow: spec and node status ----------------------------------------------------------------------

class _Status:
    """status.nodes as Argo's controller leaves it for a finished run (operator.go:2306-2360, 2780-2810):
    every template has a retry strategy (pfedla's install sets one by default), so every node has a
    Retry parent holding the same inputs and outputs."""

    def __init__(self, run: _Run):
        self.run = run
        self.nodes: dict[str, dict[str, Any]] = {}
        self.pods = 0

    def node_id(self, name: str) -> str:
        """wf.NodeID (pkg/apis/workflow/v1alpha1/workflow_types.go): the workflow's name and the FNV-1a
        hash of the node's name."""
        digest = 0x811C9DC5
        for byte in name.encode():
            digest = ((digest ^ byte) * 0x01000193) & 0xFFFFFFFF
        return f"{self.run.workflow}-{digest}"

    def add(self, name: str, boundary: str, kind: str, template: str, inputs: dict[str, str] | None = None,
            outputs: dict[str, Any] | None = None) -> str:
        ids = self.run.ids
        node_id = self.node_id(name)
        node: dict[str, Any] = {"id": node_id, "name": name, "displayName": name.rsplit(".", 1)[-1],
                                "type": kind, "templateName": template,
                                "templateScope": f"local/{self.run.workflow}", "phase": "Succeeded",
                                "boundaryID": self.node_id(boundary), "startedAt": ids.time(),
                                "finishedAt": ids.time(), "progress": "1/1",
                                "resourcesDuration": {"cpu": int(ids.digits(3)),
                                                      "memory": int(ids.digits(5))}}
        if inputs:
            node["inputs"] = {"parameters": [{"name": key, "value": value} for key, value in inputs.items()]}
        if outputs:
            node["outputs"] = outputs
        if kind == "Pod":
            node["hostNodeName"] = f"gke-gpu-pool-1-7f3a92c1-{ids.rng.choice(HOSTS)}"
            self.pods += 1
        self.nodes[node_id] = node
        return node_id

    def retried(self, name: str, boundary: str, kind: str, template: str,
                inputs: dict[str, str] | None = None,
                outputs: dict[str, Any] | None = None) -> None:
        attempt = self.add(f"{name}(0)", boundary, kind, template, inputs, outputs)
        parent = self.add(name, boundary, "Retry", template, inputs, outputs)
        self.nodes[parent]["children"] = [attempt]

    def dag_driver(self, name: str, boundary: str, inputs: dict[str, str]) -> None:
        outputs = {"parameters": [{"name": "execution-id", "value": self.run.ids.digits(MLMD_ID_DIGITS)},
                                  {"name": "iteration-count", "value": "0"},
                                  {"name": "condition", "value": ""}],
                   "exitCode": "0"}
        self.retried(name, boundary, "Pod", "system-dag-driver", inputs, outputs)

    def container_task(self, task: _Task, patch: str) -> None:
        """dag.go:282-336 and container.go:395-437: the driver pod, the executor DAG, the impl pod."""
        container, platform = self.run.executor(task)
        node = f"{task.scope.node}.{task.name}"
        inputs = {"component": go_json(task.component), "task": go_json(task.spec),
                  "container": go_json(container), "task-name": task.name,
                  "parent-dag-id": self.run.ids.digits(MLMD_ID_DIGITS), "iteration-index": "-1"}
        if platform:
            inputs["kubernetes-config"] = go_json(platform)
        outputs = {"parameters": [{"name": "pod-spec-patch", "value": patch},
                                  {"name": "cached-decision", "value": "false"},
                                  {"name": "condition", "value": ""}],
                   "exitCode": "0"}
        dag = task.scope.node
        self.retried(f"{node}-driver", dag, "Pod", "system-container-driver", inputs, outputs)
        executor_inputs = {"pod-spec-patch": patch, "cached-decision": "false"}
        self.retried(node, dag, "DAG", "system-container-executor", executor_inputs)
        logs = {"artifacts": [{"name": "main-logs", "s3": {"key": ARCHIVE_LOCATION["s3"]["key"]}}],
                "exitCode": "0"}
        self.retried(f"{node}.executor", node, "Pod", "system-container-impl", {"pod-spec-patch": patch},
                     logs)

    def dag_task(self, task: _Task) -> None:
        """dag.go:249-281: the DAG driver pod, then the DAG."""
        node, dag = f"{task.scope.node}.{task.name}", task.scope.node
        self.dag_driver(f"{node}-driver", dag, {
            "component": go_json(task.component), "task": go_json(task.spec), "task-name": task.name,
            "parent-dag-id": "0", "iteration-index": "-1", "driver-type": "DAG"})
        self.retried(node, dag, "DAG", task.spec["componentRef"]["name"],
                     {"parent-dag-id": "0", "condition": ""})

    def loop_task(self, task: _Task) -> None:
        """dag.go:360-488: the iterator DAG and its driver, then per iteration a DAG, a driver and the
        item DAG."""
        node = f"{task.scope.node}.{task.name}"
        component, spec = go_json(task.component), go_json(task.spec)
        self.retried(node, task.scope.node, "DAG", f"{task.name}-iterator", {"parent-dag-id": "0"})
        self.dag_driver(f"{node}.iteration-driver", node, {"component": component, "parent-dag-id": "0",
                                                           "task": spec, "task-name": task.name})
        for index in range(len(task.items)):
            iteration = f"{node}.iteration-iterations({index}:{index})"
            self.retried(iteration, node, "DAG", f"{task.name}-iteration",
                         {"parent-dag-id": "0", "iteration-index": str(index)})
            self.dag_driver(f"{iteration}.iteration-item-driver", iteration, {
                "component": component, "iteration-index": str(index), "parent-dag-id": "0", "task": spec,
                "task-name": task.name})
            self.retried(f"{iteration}.iteration-item", iteration, "DAG", task.spec["componentRef"]["name"],
                         {"parent-dag-id": "0", "condition": ""})


def _spec_bytes(ir: dict[str, Any], kubernetes: dict[str, Any]) -> int:
    """The compiled Workflow's spec (argocompiler/argo.go, dag.go): each distinct component spec and
    implementation once in spec.arguments, each executor's Kubernetes config, every DAG component's
    spec, and a DAG template per DAG component whose entries hold each task's spec inline."""
    components = ir["components"]
    containers = [c for c in components.values() if "dag" not in c]
    arguments = {go_json(c) for c in containers}
    executors = ir["deploymentSpec"]["executors"]
    arguments |= {go_json(executors[c["executorLabel"]]["container"]) for c in containers}
    arguments |= {go_json(config) for config in kubernetes.values()}
    dags = [ir["root"], *(c for c in components.values() if "dag" in c)]
    arguments |= {go_json(dag) for dag in dags}
    size = SPEC_FIXED_BYTES + sum(escaped_len(value) + SPEC_ARGUMENT_BYTES for value in arguments)
    variants = {(go_json(kubernetes.get(c["executorLabel"], {}).get("podMetadata")), "retryPolicy" in t)
                for dag in dags for t in dag["dag"]["tasks"].values()
                for c in [components[t["componentRef"]["name"]]] if "dag" not in c}
    size += SPEC_VARIANT_BYTES * len(variants)
    for dag in dags:
        size += SPEC_DAG_TEMPLATE_BYTES
        for task in dag["dag"]["tasks"].values():
            inline = escaped_len(go_json(task))
            if "parameterIterator" in task:
                size += SPEC_LOOP_BYTES + 3 * inline
            elif "dag" in components[task["componentRef"]["name"]]:
                size += SPEC_DAG_TASK_BYTES + inline
            else:
                size += SPEC_CONTAINER_TASK_BYTES + inline
    return size


def estimate(documents: list[dict[str, Any]], seed: int = 0) -> Estimate:
    """Each pod's executor input and ARGO_TEMPLATE, and the finished Workflow object, of a run of the
    compiled pipeline ``documents`` (the pipeline spec, then its platform spec, as KFP writes them)."""
    ir = documents[0]
    platforms = documents[1].get("platforms", {}) if len(documents) > 1 else {}
    kubernetes = platforms.get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})
    ids = _Ids(seed)
    pipeline = ir["pipelineInfo"]["name"]
    run = _Run(ir, kubernetes, pipeline, ids.uuid(), f"{pipeline}-{ids.digits(5)}", ids)
    status = _Status(run)
    defaults = {name: spec.get("defaultValue")
                for name, spec in ir["root"].get("inputDefinitions", {}).get("parameters", {}).items()}
    root = f"{run.workflow}.root"
    status.retried(run.workflow, run.workflow, "DAG", "entrypoint")
    status.dag_driver(f"{run.workflow}.root-driver", run.workflow, {
        "component": go_json(ir["root"]), "runtime-config": go_json({"parameterValues": defaults}),
        "driver-type": "ROOT_DAG"})
    status.retried(root, run.workflow, "DAG", "root", {"parent-dag-id": "0", "condition": ""})
    pods = []
    for task in _walk(ir, ir["root"], _Scope(root, "", defaults, {})):
        if task.kind == "loop":
            status.loop_task(task)
        elif task.kind == "dag":
            status.dag_task(task)
        else:
            executor_input = go_json(run.executor_input(task))
            patch = run.pod_spec_patch(task, executor_input)
            pods.append(PodSize(f"{task.scope.label}{task.name}", len(executor_input),
                                run.argo_template(task, patch)))
            status.container_task(task, patch)
    nodes = go_json(dict(sorted(status.nodes.items()))).encode()  # json.Marshal sorts a map by key
    packed = base64.b64encode(gzip.compress(nodes, compresslevel=6))  # util/file/fileutil.go:85-120
    other = WORKFLOW_METADATA_BYTES + STATUS_FIXED_BYTES + TASK_RESULT_BYTES * status.pods
    workflow = WorkflowSize(len(status.nodes), _spec_bytes(ir, kubernetes), len(nodes), len(packed), other)
    return Estimate(pods, workflow)
