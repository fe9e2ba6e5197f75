"""pfedla.ops.deploy without a cluster.

A live-cluster test (apply to an API server, wait for rollouts) cannot run here: this
machine has no Docker engine, no kind and no Kubernetes. So these tests cover what is pure
(overlay resolution, rendering with the real ``kubectl kustomize``, credential override,
namespace retargeting, apply ordering, reading object and pod status from status documents)
and the failure when no cluster is reachable, which is real: an absent or empty kubeconfig,
and a kubeconfig whose API server address on loopback refuses connections. Nothing is
mocked.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pfedla.ops import deploy as d
from pfedla.ops.deploy import DeployError

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"


def _obj(kind: str, name: str, namespace: str | None = "pfedla", api: str = "v1") -> dict:
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": api, "kind": kind, "metadata": meta}


@pytest.fixture
def k8s_copy(tmp_path) -> Path:
    """A copy of k8s/ without any local secrets.env, as on a clean clone."""
    target = tmp_path / "k8s"
    shutil.copytree(K8S, target, ignore=shutil.ignore_patterns("secrets.env", ".render.*"))
    return target


IDENTITIES = ("ADMIN", "MLFLOW", "STEPS")
REAL = {
    **{f"PFEDLA_S3_{who}_ACCESS_KEY_ID": f"real{who.lower()}access" for who in IDENTITIES},
    **{f"PFEDLA_S3_{who}_SECRET_ACCESS_KEY": f"real{who.lower()}secret42" for who in IDENTITIES},
}


@pytest.fixture
def real_env(tmp_path) -> Path:
    path = tmp_path / "real.env"
    path.write_text("# real ones\n" + "".join(f"{key}={value}\n" for key, value in REAL.items()))
    return path


@pytest.fixture
def no_cluster_env(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)


def _secrets(objects):
    return {
        o["metadata"]["namespace"]: {k: base64.b64decode(v).decode() for k, v in o["data"].items()}
        for o in objects
        if o["kind"] == "Secret"
    }


# --------------------------------------------------------------------------- ordering


def test_apply_order_puts_dependencies_first_and_jobs_last():
    objects = [
        _obj("Job", "bucket", api="batch/v1"),
        _obj("Deployment", "mlflow", api="apps/v1"),
        _obj("Service", "mlflow"),
        _obj("Widget", "custom", api="example.com/v1"),
        _obj("NetworkPolicy", "deny", api="networking.k8s.io/v1"),
        _obj("RoleBinding", "runner", api="rbac.authorization.k8s.io/v1"),
        _obj("Role", "runner", api="rbac.authorization.k8s.io/v1"),
        _obj("PersistentVolumeClaim", "db"),
        _obj("ConfigMap", "endpoints"),
        _obj("Secret", "creds"),
        _obj("ServiceAccount", "runner"),
        _obj("StatefulSet", "store", api="apps/v1"),
        _obj("ValidatingWebhookConfiguration", "hook", None, "admissionregistration.k8s.io/v1"),
        _obj("CustomResourceDefinition", "widgets.example.com", None, "apiextensions.k8s.io/v1"),
        _obj("Namespace", "pfedla", None),
    ]
    kinds = [o["kind"] for o in d.apply_order(objects)]
    assert kinds == [
        "Namespace",
        "CustomResourceDefinition",
        "PersistentVolumeClaim",
        "ConfigMap",
        "Secret",
        "ServiceAccount",  # input order kept
        "Role",
        "RoleBinding",
        "NetworkPolicy",
        "Service",
        "Widget",
        "Deployment",
        "StatefulSet",
        "Job",
        "ValidatingWebhookConfiguration",
    ]


def test_apply_order_of_the_kind_overlay():
    objects = d.apply_order(d.kustomize(d.resolve_overlay("kind")))
    kinds = [o["kind"] for o in objects]
    assert kinds[0] == "Namespace" and kinds[-1] == "Job"
    position = {kind: i for i, kind in enumerate(kinds)}  # last position of each kind
    first = {kind: kinds.index(kind) for kind in kinds}
    assert position["Secret"] < first["Deployment"] and position["ConfigMap"] < first["Deployment"]
    assert position["PersistentVolumeClaim"] < first["Deployment"]
    assert position["NetworkPolicy"] < first["Service"] and position["Service"] < first["Deployment"]
    assert position["Deployment"] < first["Job"]


# --------------------------------------------------------------------------- overlays


def test_named_overlays_resolve_to_the_checkout():
    assert d.resolve_overlay("kind") == (K8S / "overlays" / "kind").resolve()
    assert d.resolve_overlay("gpu") == (K8S / "overlays" / "gpu").resolve()
    assert d.resolve_overlay(K8S / "base") == (K8S / "base").resolve()


def test_unknown_overlay_name_is_rejected():
    with pytest.raises(DeployError, match=r"unknown overlay 'gke'.*kind, gpu"):
        d.resolve_overlay("gke")


def test_path_without_kustomization_is_rejected(tmp_path):
    with pytest.raises(DeployError, match="no kustomization.yaml"):
        d.resolve_overlay(tmp_path)
    with pytest.raises(DeployError, match="not a directory"):
        d.resolve_overlay(tmp_path / "missing" / "overlay")


def test_deploy_rejects_a_bad_overlay_before_touching_a_cluster(tmp_path):
    with pytest.raises(DeployError, match="unknown overlay"):
        d.deploy("production")
    with pytest.raises(DeployError, match="no kustomization.yaml"):
        d.deploy(tmp_path)


def test_find_kubectl_finds_an_executable():
    path = Path(d.find_kubectl())
    assert path.is_file() and os.access(path, os.X_OK)


def test_parse_manifests_flattens_lists_and_rejects_non_objects():
    text = yaml.safe_dump_all(
        [
            {"apiVersion": "v1", "kind": "List", "items": [_obj("ConfigMap", "a"), _obj("Secret", "b")]},
            None,
            _obj("Service", "c"),
        ]
    )
    assert [o["metadata"]["name"] for o in d.parse_manifests(text)] == ["a", "b", "c"]
    with pytest.raises(DeployError, match="not a Kubernetes object"):
        d.parse_manifests("- just\n- a list\n")
    with pytest.raises(DeployError, match="without metadata.name"):
        d.parse_manifests("apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n")


def test_a_broken_kustomization_reports_kubectl_error(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    with pytest.raises(DeployError, match="kubectl kustomize .* failed"):
        d.kustomize(tmp_path)


# --------------------------------------------------------------------------- credentials


def test_render_replaces_placeholder_credentials_everywhere(k8s_copy, real_env):
    overlay = k8s_copy / "overlays" / "kind"
    plain = d.render(overlay)
    example = d.read_env_file(k8s_copy / "base" / "secrets.env.example")

    def steps_only(values):  # the steps' Secret in kubeflow: their identity, under boto3's names
        return {"AWS_ACCESS_KEY_ID": values["PFEDLA_S3_STEPS_ACCESS_KEY_ID"],
                "AWS_SECRET_ACCESS_KEY": values["PFEDLA_S3_STEPS_SECRET_ACCESS_KEY"]}

    assert _secrets(plain) == {"pfedla": example, "kubeflow": steps_only(example)}
    assert sorted(d.placeholder_secrets(plain, k8s_copy / "base" / "secrets.env.example")) == [
        "kubeflow/pfedla-s3-credentials",
        "pfedla/pfedla-s3-identities",
    ]

    real = d.render(overlay, secrets_env=real_env)
    assert _secrets(real) == {"pfedla": REAL, "kubeflow": steps_only(REAL)}
    assert d.placeholder_secrets(real, k8s_copy / "base" / "secrets.env.example") == []
    checksum = hashlib.sha256(real_env.read_bytes()).hexdigest()
    for obj in real:
        if obj["kind"] == "Deployment":
            annotations = obj["spec"]["template"]["metadata"]["annotations"]
            assert annotations[d.CREDENTIALS_CHECKSUM_ANNOTATION] == checksum
        if obj["kind"] == "Secret":
            assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "pfedla"
    strip = [o for o in real if o["kind"] not in ("Secret", "Deployment")]
    assert strip == [o for o in plain if o["kind"] not in ("Secret", "Deployment")]


def test_render_rejects_an_env_file_with_other_keys(k8s_copy, tmp_path):
    env = tmp_path / "secrets.env"
    env.write_text("".join(f"{key}=x{i}\n" for i, key in enumerate(REAL) if "ADMIN_SECRET" not in key)
                   + "PFEDLA_S3_ADMIN_SECRET_KEY=typo\n")
    expected = r"missing: \['PFEDLA_S3_ADMIN_SECRET_ACCESS_KEY'\], unknown: \['PFEDLA_S3_ADMIN_SECRET_KEY'\]"
    with pytest.raises(DeployError, match=expected):
        d.render(k8s_copy / "overlays" / "kind", secrets_env=env)
    env.write_text("AWS_ACCESS_KEY_ID=x\nAWS_SECRET_ACCESS_KEY=y\n")  # a file from before the split
    expected = r"unknown: \['AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY'\].*--generate-secrets"
    with pytest.raises(DeployError, match=expected):
        d.render(k8s_copy / "overlays" / "kind", secrets_env=env)
    env.write_text("just a line\n")
    with pytest.raises(DeployError, match="expected KEY=VALUE"):
        d.read_env_file(env)


def test_generated_credentials_are_random_private_and_never_overwritten(k8s_copy):
    env_file = d.ensure_secrets_env(k8s_copy / "base")
    first = env_file.read_text()
    values = d.read_env_file(env_file)
    example = d.read_env_file(k8s_copy / "base" / "secrets.env.example")
    assert values.keys() == example.keys()
    assert not set(values.values()) & set(example.values())
    assert all(len(v) >= 16 and v.isalnum() for v in values.values())
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert d.ensure_secrets_env(k8s_copy / "base") == env_file and env_file.read_text() == first
    objects = d.render(k8s_copy / "overlays" / "kind", secrets_env=env_file)
    assert set(_secrets(objects)["pfedla"].values()) == set(values.values())


STUB = """#!/usr/bin/env bash
# stand-in for {name}: records its arguments{extra}
echo "$*" >> "{log}"
{body}
"""


def _stub(folder: Path, name: str, log: Path, body: str = "exit 0", extra: str = "") -> None:
    path = folder / name
    path.write_text(STUB.format(name=name, log=log, body=body, extra=extra))
    path.chmod(0o755)


def _kind_kubeconfig(api: FakeApiServer, path: Path) -> Path:
    config = yaml.safe_load(api.kubeconfig(path).read_text())
    config["contexts"][0]["name"] = config["current-context"] = "kind-pfedla"
    path.write_text(yaml.safe_dump(config))
    return path


def test_make_kind_up_applies_exactly_what_pfedla_deploy_applies(tmp_path, no_cluster_env):
    """k8s/kind/up.sh (make kind-up) runs for real up to the deployment; kind, docker and the KFP
    install (kubectl) are stand-ins that record their calls, and FakeApiServer stands in for the
    cluster: no Kubernetes API server can run here. It must apply the same objects, credentials
    included, as `pfedla deploy --overlay kind` against another stand-in."""
    checkout = tmp_path / "checkout"  # the tracked files, as in a clean clone: no secrets.env yet
    tracked = subprocess.run(["git", "ls-files"], cwd=K8S.parent, capture_output=True, text=True, check=True)
    for name in tracked.stdout.splitlines():
        if (K8S.parent / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(K8S.parent / name, checkout / name)
    stubs, calls = tmp_path / "stubs", tmp_path / "calls.log"
    stubs.mkdir()
    _stub(stubs, "kind", calls, body='[[ "$1 $2" == "get clusters" ]] && echo pfedla; exit 0')
    _stub(stubs, "docker", calls, body='[[ "$1" == info ]]', extra=" (no image built: exits 1 but for info)")
    _stub(stubs, "kubectl", calls)
    with FakeApiServer() as cluster:
        path = os.pathsep.join([str(stubs), str(Path(sys.executable).parent), os.environ["PATH"]])
        kubeconfig = _kind_kubeconfig(cluster, tmp_path / "kc1")
        env = {**os.environ, "PATH": path, "KUBECTL": str(stubs / "kubectl"), "KUBECONFIG": str(kubeconfig)}
        proc = subprocess.run([str(checkout / "k8s" / "kind" / "up.sh")], env=env, capture_output=True,
                              text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        by_script = {path: cluster.objects[path] for _, path, _, _ in cluster.patches()}
    recorded = calls.read_text()
    assert "--context kind-pfedla apply -k github.com/kubeflow/pipelines/manifests/kustomize/" \
           "cluster-scoped-resources?ref=" in recorded
    assert "kind load" not in recorded  # the image was not built: up.sh says so instead
    secrets_env = checkout / "k8s" / "base" / "secrets.env"
    assert d.read_env_file(secrets_env).keys() == REAL.keys()
    with FakeApiServer() as cluster:
        kubeconfig = _kind_kubeconfig(cluster, tmp_path / "kc2")
        d.deploy(checkout / "k8s" / "overlays" / "kind", kubeconfig=kubeconfig, context="kind-pfedla")
        directly = {path: cluster.objects[path] for _, path, _, _ in cluster.patches()}
    assert list(by_script) == list(directly) and by_script == directly
    assert any(body["kind"] == "Secret" and body["metadata"]["namespace"] == "kubeflow"
               for body in by_script.values())


def test_gpu_overlay_refuses_placeholder_credentials(
    k8s_copy, no_cluster_env, tmp_path, monkeypatch, real_env
):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with pytest.raises(DeployError, match=r"placeholder credentials.*secrets\.env"):
        d.deploy(k8s_copy / "overlays" / "gpu")
    # with real credentials it gets as far as looking for a cluster
    shutil.copyfile(real_env, k8s_copy / "base" / "secrets.env")
    with pytest.raises(DeployError, match="no Kubernetes cluster reachable"):
        d.deploy(k8s_copy / "overlays" / "gpu")


def test_missing_explicit_secrets_env_is_an_error():
    with pytest.raises(DeployError, match="does not exist"):
        d.deploy("kind", secrets_env="/nonexistent/secrets.env")


# --------------------------------------------------------------------------- namespace


def test_retarget_namespace_moves_only_pfedla_objects():
    objects = d.retarget_namespace(d.kustomize(d.resolve_overlay("kind")), "team-a")
    namespaces = [o for o in objects if o["kind"] == "Namespace"]
    assert [n["metadata"]["name"] for n in namespaces] == ["team-a"]
    placed = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
    assert placed == {"team-a", "kubeflow"}
    endpoints = [o for o in objects if o["kind"] == "ConfigMap"]
    for configmap in endpoints:  # both copies point at the moved services
        assert configmap["data"]["MLFLOW_TRACKING_URI"] == "http://mlflow.team-a.svc.cluster.local:5000"
    (kf_binding,) = [o for o in objects if o["kind"] == "RoleBinding"]  # the runner's, where steps run
    assert kf_binding["metadata"]["namespace"] == kf_binding["subjects"][0]["namespace"] == "kubeflow"
    (steps,) = [o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["namespace"] != "team-a"]
    peers = [peer for rule in steps["spec"]["egress"] for peer in rule["to"]]
    moved = [p for p in peers if p.get("namespaceSelector", {}).get("matchLabels", {}).get(
        "kubernetes.io/metadata.name") == "team-a"]
    assert len(moved) == 2  # the steps still reach MLflow and S3 where they moved
    text = yaml.safe_dump_all(objects)
    assert ".pfedla.svc" not in text and "kubernetes.io/metadata.name: pfedla" not in text
    with pytest.raises(DeployError, match="invalid namespace"):
        d.retarget_namespace(objects, "Team_A")


# --------------------------------------------------------------------------- status reading


def test_rollout_status_of_deployments_and_jobs():
    deployment = {
        "kind": "Deployment",
        "metadata": {"name": "m", "namespace": "p", "generation": 2},
        "spec": {"replicas": 1},
    }
    deployment["status"] = {
        "observedGeneration": 1,
        "replicas": 1,
        "updatedReplicas": 1,
        "availableReplicas": 1,
    }
    assert d.rollout_status(deployment)[0] is False  # controller has not seen generation 2
    deployment["status"]["observedGeneration"] = 2
    assert d.rollout_status(deployment) == (True, "1/1 available")
    deployment["status"]["availableReplicas"] = 0
    assert d.rollout_status(deployment) == (False, "0/1 available")

    job = {"kind": "Job", "metadata": {"name": "j", "namespace": "p"}, "status": {"active": 1}}
    assert d.rollout_status(job) == (False, "1 active, 0 failed")
    job["status"]["conditions"] = [{"type": "Complete", "status": "True"}]
    assert d.rollout_status(job) == (True, "complete")
    job["status"]["conditions"] = [
        {
            "type": "Failed",
            "status": "True",
            "reason": "BackoffLimitExceeded",
            "message": "Job has reached the specified backoff limit",
        }
    ]
    with pytest.raises(DeployError, match="Job p/j failed: BackoffLimitExceeded"):
        d.rollout_status(job)


def test_pod_problem_explains_pending_and_crashing_pods():
    pending = {
        "metadata": {"name": "gpu-check-x"},
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                }
            ],
        },
    }
    assert "Insufficient nvidia.com/gpu" in d.pod_problem(pending)
    pulling = {
        "metadata": {"name": "mlflow-y"},
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": "mlflow",
                    "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}},
                }
            ],
        },
    }
    assert d.pod_problem(pulling) == "pod mlflow-y container mlflow: ImagePullBackOff not found"
    starting = {
        "metadata": {"name": "z"},
        "status": {
            "phase": "Pending",
            "containerStatuses": [{"name": "c", "state": {"waiting": {"reason": "ContainerCreating"}}}],
        },
    }
    assert d.pod_problem(starting) is None


# --------------------------------------------------------------------------- no cluster


def test_no_kubeconfig_and_not_in_a_cluster(tmp_path, monkeypatch, no_cluster_env):
    missing = tmp_path / "no-such-kubeconfig"
    monkeypatch.setenv("KUBECONFIG", str(missing))
    with pytest.raises(DeployError) as excinfo:
        d.deploy("kind")
    message = str(excinfo.value)
    assert message.startswith("no Kubernetes cluster reachable: no kubeconfig at")
    assert str(missing) in message and "not running in a cluster" in message
    assert "make kind-up" in message


def test_empty_kubeconfig(tmp_path, monkeypatch, no_cluster_env):
    empty = tmp_path / "kubeconfig"
    empty.write_text("")
    monkeypatch.setenv("KUBECONFIG", str(empty))
    with pytest.raises(DeployError, match="no Kubernetes cluster reachable: kubeconfig .* not usable"):
        d.deploy("kind")
    with pytest.raises(DeployError, match="no Kubernetes cluster reachable"):
        d.connect(kubeconfig=empty)


def test_kubeconfig_whose_api_server_refuses_connections(tmp_path, no_cluster_env):
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "gone",
                "clusters": [{"name": "gone", "cluster": {"server": f"https://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": "not-a-real-token"}}],
                "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "u"}}],
            }
        )
    )
    with pytest.raises(DeployError, match=rf"no Kubernetes cluster reachable at https://127.0.0.1:{port}"):
        d.deploy("kind", kubeconfig=kubeconfig, wait_timeout=0)
    with pytest.raises(DeployError, match="not usable"):
        d.connect(kubeconfig=kubeconfig, context="no-such-context")


# --------------------------------------------------------------------------- fake API server
#
# No Kubernetes API server can run on this machine, so the apply/wait code is exercised
# against a small in-memory stand-in on loopback that speaks the parts of the API the
# kubernetes client uses here: discovery, server-side apply (PATCH), GET, DELETE and pod
# lists. It checks the requests we send (order, apply content type, field manager, force),
# not Kubernetes' own behaviour.

_API_RESOURCES = {
    ("", "v1"): [
        ("namespaces", "Namespace", False),
        ("configmaps", "ConfigMap", True),
        ("secrets", "Secret", True),
        ("serviceaccounts", "ServiceAccount", True),
        ("services", "Service", True),
        ("persistentvolumeclaims", "PersistentVolumeClaim", True),
        ("pods", "Pod", True),
    ],
    ("apps", "v1"): [("deployments", "Deployment", True), ("statefulsets", "StatefulSet", True)],
    ("batch", "v1"): [("jobs", "Job", True)],
    ("rbac.authorization.k8s.io", "v1"): [("roles", "Role", True), ("rolebindings", "RoleBinding", True)],
    ("networking.k8s.io", "v1"): [("networkpolicies", "NetworkPolicy", True)],
}


class FakeApiServer:
    def __init__(self, namespaces=("kubeflow",), stuck=(), pods=()):
        import http.server
        import json
        import threading
        from urllib.parse import parse_qs, urlsplit

        self.objects = {
            ("/api/v1/namespaces/" + ns): {"kind": "Namespace", "metadata": {"name": ns}} for ns in namespaces
        }
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _not_found(self, path):
                self._send(
                    404,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "reason": "NotFound",
                        "code": 404,
                        "message": f"{path} not found",
                    },
                )

            def do_GET(self):
                url = urlsplit(self.path.rstrip("/"))
                server.requests.append(("GET", url.path, parse_qs(url.query), None))
                if url.path == "/version":
                    return self._send(200, {"major": "1", "minor": "36", "gitVersion": "v1.36.1"})
                if url.path == "/apis":
                    groups = [
                        {
                            "name": g,
                            "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                            "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v},
                        }
                        for g, v in _API_RESOURCES
                        if g
                    ]
                    return self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
                for (group, version), resources in _API_RESOURCES.items():
                    prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
                    if url.path == prefix:
                        return self._send(
                            200,
                            {
                                "kind": "APIResourceList",
                                "groupVersion": prefix.split("/", 2)[-1],
                                "resources": [
                                    {
                                        "name": n,
                                        "singularName": "",
                                        "namespaced": ns,
                                        "kind": k,
                                        "verbs": ["get", "list", "patch", "delete"],
                                    }
                                    for n, k, ns in resources
                                ],
                            },
                        )
                if url.path.endswith("/pods"):
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1", "items": list(pods)})
                if url.path in server.objects:
                    return self._send(200, server.objects[url.path])
                return self._not_found(url.path)

            def do_PATCH(self):
                url = urlsplit(self.path)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(("PATCH", url.path, parse_qs(url.query), self.headers["Content-Type"]))
                old = server.objects.get(url.path)
                if body["kind"] == "Job" and old and old["spec"]["template"] != body["spec"]["template"]:
                    return self._send(
                        422,
                        {
                            "kind": "Status",
                            "apiVersion": "v1",
                            "status": "Failure",
                            "reason": "Invalid",
                            "code": 422,
                            "message": "spec.template: field is immutable",
                        },
                    )
                body["metadata"]["generation"] = 1
                name = body["metadata"]["name"]
                if body["kind"] == "Deployment":
                    ready = 0 if name in stuck else body["spec"].get("replicas", 1)
                    body["status"] = {
                        "observedGeneration": 1,
                        "replicas": 1,
                        "updatedReplicas": 1,
                        "availableReplicas": ready,
                    }
                if body["kind"] == "Job":
                    body["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
                server.objects[url.path] = body
                self._send(200, body)

            def do_DELETE(self):
                url = urlsplit(self.path)
                server.requests.append(("DELETE", url.path, parse_qs(url.query), None))
                if server.objects.pop(url.path, None) is None:
                    return self._not_found(url.path)
                self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "fake",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "u", "user": {"token": "fake"}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
                }
            )
        )
        return path

    def patches(self):
        return [r for r in self.requests if r[0] == "PATCH"]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_deploy_applies_in_order_with_server_side_apply_and_waits(tmp_path, no_cluster_env):
    with FakeApiServer() as api:
        applied = d.deploy("kind", kubeconfig=api.kubeconfig(tmp_path / "kc"), wait_timeout=30)
        rendered = d.apply_order(
            d.render(d.resolve_overlay("kind"), secrets_env=d.default_secrets_env(d.resolve_overlay("kind")))
        )
        assert applied == [d.object_ref(o) for o in rendered]
        patches = api.patches()
        assert len(patches) == len(rendered)
        for (_, path, query, content_type), obj in zip(patches, rendered, strict=True):
            assert path.endswith("/" + obj["metadata"]["name"])
            assert content_type == "application/apply-patch+yaml"
            assert query["fieldManager"] == ["pfedla"] and [f.lower() for f in query["force"]] == ["true"]
        assert patches[0][1] == "/api/v1/namespaces/pfedla"
        assert patches[-1][1] == "/apis/batch/v1/namespaces/pfedla/jobs/pfedla-create-bucket"
        waited = {r[1] for r in api.requests[api.requests.index(patches[-1]) :] if r[0] == "GET"}
        assert "/apis/apps/v1/namespaces/pfedla/deployments/mlflow" in waited


def test_deploy_needs_the_kubeflow_namespace(tmp_path, no_cluster_env, real_env):
    with FakeApiServer(namespaces=()) as api:
        with pytest.raises(DeployError, match="namespace.*kubeflow do not exist: install Kubeflow Pipelines"):
            d.deploy("kind", kubeconfig=api.kubeconfig(tmp_path / "kc"))
        assert api.patches() == []
        api.objects["/api/v1/namespaces/kubeflow"] = {"kind": "Namespace", "metadata": {"name": "kubeflow"}}
        # the base alone lives in pfedla only
        d.deploy(
            K8S / "base", kubeconfig=api.kubeconfig(tmp_path / "kc"), wait_timeout=0, secrets_env=real_env
        )


def test_changed_job_is_replaced(tmp_path, no_cluster_env):
    with FakeApiServer() as api:
        kubeconfig = api.kubeconfig(tmp_path / "kc")
        d.deploy("kind", kubeconfig=kubeconfig, wait_timeout=0)
        job_path = "/apis/batch/v1/namespaces/pfedla/jobs/pfedla-create-bucket"
        api.objects[job_path]["spec"]["template"]["spec"]["containers"][0]["image"] = "old:1"
        d.deploy("kind", kubeconfig=kubeconfig, wait_timeout=0)
        assert ("DELETE", job_path) in [(r[0], r[1]) for r in api.requests]
        assert api.objects[job_path]["spec"]["template"]["spec"]["containers"][0]["image"] != "old:1"


def test_wait_timeout_names_what_is_not_ready_and_why(tmp_path, no_cluster_env):
    pod = {
        "metadata": {"name": "mlflow-abc"},
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": "mlflow",
                    "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such tag"}},
                }
            ],
        },
    }
    with FakeApiServer(stuck={"mlflow"}, pods=[pod]) as api, pytest.raises(DeployError) as excinfo:
        d.deploy("kind", kubeconfig=api.kubeconfig(tmp_path / "kc"), wait_timeout=1)
    message = str(excinfo.value)
    assert message.startswith("not ready after 1 s: Deployment pfedla/mlflow (0/1 available")
    assert "pod mlflow-abc container mlflow: ImagePullBackOff no such tag" in message
    assert "seaweedfs" not in message
