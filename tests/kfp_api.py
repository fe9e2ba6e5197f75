"""A local HTTP server speaking the Kubeflow Pipelines v2beta1 endpoints that ``kfp.Client`` uses.

It stands in for a cluster (none can run here): it keeps experiments and runs in memory and
moves each run through the states a script gives it, one state per ``GET`` of that run. It
does not execute pipelines; tests read the pipeline spec each run was submitted with.
Endpoints (paths under ``/apis/v2beta1``), with the request shapes kfp 2.17's client sends:

- ``GET /healthz``; ``GET /experiments?filter=...`` (display name EQUALS), ``POST /experiments``,
  ``GET /experiments/{id}``;
- ``POST /runs`` (the compiled spec embedded as ``pipeline_spec``), ``GET /runs/{id}``,
  ``GET /runs?experiment_id=&filter=&page_size=&page_token=`` (display name EQUALS or
  IS_SUBSTRING, paged), ``POST /runs/{id}:terminate`` (CANCELING, then FAILED, as KFP 2.17 does).

By default it is standalone (single-user) KFP, as ``k8s/kind/up.sh`` installs it. With ``token``
and ``namespace`` set (fixture ``kfp_api_multi_user``) it stands in for multi-user Kubeflow: every
request without ``Authorization: Bearer <token>`` is refused with 401 (KFP 2.17 authenticates the
bearer token, backend/src/apiserver/auth/auth.go), and experiments are listed, created and
read, and runs created and read, only in that profile namespace (an experiment without a
namespace, or in another one, is refused: experiments are namespaced in multi-user mode).
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

PREFIX = "/apis/v2beta1"
EQUALS, IS_SUBSTRING = ("EQUALS", 1), ("IS_SUBSTRING", 9)
EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)

# display name -> the states a new run of that name goes through, one per GET (the last one stays)
Script = Callable[[str], list[str]]


def succeed(_name: str) -> list[str]:
    return ["PENDING", "RUNNING", "SUCCEEDED"]


@dataclass
class FakeRun:
    run_id: str
    experiment_id: str
    display_name: str
    body: dict[str, Any]
    states: list[str]
    created: int  # creation order
    states_of_others: dict[str, str]  # what every earlier run's state was when this one was created
    polls: int = 0

    @property
    def state(self) -> str:
        return self.states[min(self.polls, len(self.states) - 1)]

    def as_json(self) -> dict[str, Any]:
        created = (EPOCH + timedelta(seconds=self.created)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "display_name": self.display_name,
                "state": self.state, "created_at": created, "storage_state": "AVAILABLE",
                "service_account": self.body.get("service_account")}


@dataclass
class FakeKfpApi:
    """The server's memory; tests set ``script`` and read ``runs``."""

    url: str = ""
    script: Script = succeed
    max_page_size: int = 2  # small pages, so clients must follow next_page_token
    token: str | None = None  # multi-user: the bearer token every request must carry
    namespace: str | None = None  # multi-user: the profile namespace everything lives in
    echo_auth: bool = False  # a refusal quotes the Authorization header it got (as a careless proxy might)
    experiments: dict[str, str] = field(default_factory=dict)  # id -> display name
    experiment_namespaces: dict[str, str | None] = field(default_factory=dict)  # id -> namespace
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Authorization
    runs: list[FakeRun] = field(default_factory=list)
    terminated: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, run_id: str) -> FakeRun | None:
        return next((r for r in self.runs if r.run_id == run_id), None)

    def submitted_config(self, run: FakeRun) -> dict[str, Any]:
        """The experiment config a run was compiled with (the pipeline's ``config_json`` default)."""
        spec = run.body["pipeline_spec"]
        spec = spec.get("pipeline_spec", spec)
        return json.loads(spec["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"])

    def platform(self, run: FakeRun) -> dict[str, Any]:
        return run.body["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]


def _matches(predicate: dict[str, Any], value: str) -> bool:
    expected = predicate.get("string_value", predicate.get("stringValue"))
    operation = predicate.get("operation")
    if operation in EQUALS:
        return value == expected
    if operation in IS_SUBSTRING:
        return expected in value
    raise ValueError(f"operation {operation!r} is not supported by the fake")


def _filtered(items: list[Any], query: dict[str, list[str]], name_of: Callable[[Any], str]) -> list[Any]:
    raw = query.get("filter", [""])[0]
    if not raw:
        return items
    for predicate in json.loads(raw).get("predicates", []):
        if predicate.get("key") not in ("display_name", "name"):
            raise ValueError(f"filter key {predicate.get('key')!r} is not supported by the fake")
        items = [item for item in items if _matches(predicate, name_of(item))]
    return items


def _handler(api: FakeKfpApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, status: int, payload: Any) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length) or b"{}")

        def _refused(self, path: str) -> bool:
            """Multi-user: reply 401 unless the request carries the bearer token."""
            header = self.headers.get("Authorization")
            api.requests.append((self.command, path, header))
            if api.token is None or header == f"Bearer {api.token}":
                return False
            quoted = f" (got {header!r})" if api.echo_auth else ""
            self._reply(401, {"code": 16, "message": f"Unauthenticated: no valid bearer token{quoted}"})
            return True

        def _outside(self, namespace: str | None) -> bool:
            """Multi-user: reply 400/403 unless ``namespace`` is the profile's."""
            if api.namespace is None or namespace == api.namespace:
                return False
            if not namespace:
                self._reply(400, {"code": 3, "message": "Invalid input error: a namespace is required in "
                                                        "multi-user mode"})
            else:
                self._reply(403, {"code": 7, "message": f"PermissionDenied: no access to {namespace}"})
            return True

        def _experiment_outside(self, experiment_id: str) -> bool:
            if experiment_id not in api.experiments:
                self._reply(404, {"code": 5, "message": "experiment not found"})
                return True
            return self._outside(api.experiment_namespaces.get(experiment_id))

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urlsplit(self.path)
            path, query = url.path.removeprefix(PREFIX), parse_qs(url.query, keep_blank_values=True)
            with api.lock:
                if self._refused(path):
                    return None
                if path == "/healthz":
                    return self._reply(200, {"multi_user": api.namespace is not None})
                if path == "/experiments":
                    namespace = query.get("namespace", [""])[0] or None
                    if self._outside(namespace):
                        return None
                    mine = [(i, n) for i, n in api.experiments.items()
                            if api.experiment_namespaces.get(i) == namespace or api.namespace is None]
                    found = _filtered(mine, query, lambda item: item[1])
                    return self._reply(200, {"experiments": [{"experiment_id": i, "display_name": n}
                                                             for i, n in found], "total_size": len(found)})
                if match := re.fullmatch(r"/experiments/([^/]+)", path):
                    if self._experiment_outside(match[1]):
                        return None
                    name = api.experiments[match[1]]
                    return self._reply(200, {"experiment_id": match[1], "display_name": name,
                                             "namespace": api.experiment_namespaces.get(match[1])})
                if path == "/runs":
                    return self._list_runs(query)
                if (match := re.fullmatch(r"/runs/([^/:]+)", path)) and (run := api.run(match[1])):
                    if self._experiment_outside(run.experiment_id):
                        return None
                    payload = run.as_json()
                    run.polls += 1
                    return self._reply(200, payload)
            return self._reply(404, {"code": 5, "message": f"no {path}"})

        def _list_runs(self, query: dict[str, list[str]]) -> None:
            experiment = query.get("experiment_id", [""])[0]
            if experiment and self._experiment_outside(experiment):
                return
            if not experiment and self._outside(query.get("namespace", [""])[0] or None):
                return
            runs = [r for r in api.runs if not experiment or r.experiment_id == experiment]
            runs = _filtered(runs, query, lambda run: run.display_name)
            start = int(query.get("page_token", [""])[0] or 0)
            size = min(int(query.get("page_size", ["10"])[0] or 10), api.max_page_size)
            page = runs[start : start + size]
            token = str(start + size) if start + size < len(runs) else ""
            self._reply(200, {"runs": [r.as_json() for r in page], "total_size": len(runs),
                              "next_page_token": token})

        def do_POST(self) -> None:  # noqa: N802
            path = urlsplit(self.path).path.removeprefix(PREFIX)
            body = self._body()
            with api.lock:
                if self._refused(path):
                    return None
                if path == "/experiments":
                    if self._outside(body.get("namespace")):
                        return None
                    experiment_id = uuid.uuid4().hex
                    api.experiments[experiment_id] = body["display_name"]
                    api.experiment_namespaces[experiment_id] = body.get("namespace")
                    return self._reply(200, {"experiment_id": experiment_id,
                                             "display_name": body["display_name"],
                                             "namespace": body.get("namespace")})
                if path == "/runs":
                    if self._experiment_outside(body.get("experiment_id", "")):
                        return None
                    run = FakeRun(uuid.uuid4().hex, body["experiment_id"], body["display_name"], body,
                                  list(api.script(body["display_name"])), len(api.runs),
                                  {r.display_name: r.state for r in api.runs})
                    api.runs.append(run)
                    return self._reply(200, run.as_json())
                if (match := re.fullmatch(r"/runs/([^/:]+):terminate", path)) and (run := api.run(match[1])):
                    if self._experiment_outside(run.experiment_id):
                        return None
                    api.terminated.append(run.run_id)
                    run.states, run.polls = ["CANCELING", "FAILED"], 0
                    return self._reply(200, {})
            return self._reply(404, {"code": 5, "message": f"no {path}"})

    return Handler


def _serve(api: FakeKfpApi) -> Iterator[FakeKfpApi]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def kfp_api(tmp_path, monkeypatch) -> Iterator[FakeKfpApi]:
    """A fresh fake standalone KFP API on 127.0.0.1; ``HOME`` points to an empty folder so no kfp
    context leaks in, and no pod token is found."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KF_PIPELINES_SA_TOKEN_PATH", raising=False)
    yield from _serve(FakeKfpApi())


@pytest.fixture
def kfp_api_multi_user(tmp_path, monkeypatch) -> Iterator[FakeKfpApi]:
    """A fake multi-user Kubeflow Pipelines API (profile ``team-a``) that refuses any request without
    its bearer token and anything outside its namespace."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KF_PIPELINES_SA_TOKEN_PATH", raising=False)
    yield from _serve(FakeKfpApi(token=f"kfp-TEST-token-{uuid.uuid4().hex}", namespace="team-a"))
