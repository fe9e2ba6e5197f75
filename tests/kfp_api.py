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
    experiments: dict[str, str] = field(default_factory=dict)  # id -> display name
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

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urlsplit(self.path)
            path, query = url.path.removeprefix(PREFIX), parse_qs(url.query, keep_blank_values=True)
            with api.lock:
                if path == "/healthz":
                    return self._reply(200, {"multi_user": False})
                if path == "/experiments":
                    found = _filtered(list(api.experiments.items()), query, lambda item: item[1])
                    return self._reply(200, {"experiments": [{"experiment_id": i, "display_name": n}
                                                             for i, n in found], "total_size": len(found)})
                if match := re.fullmatch(r"/experiments/([^/]+)", path):
                    if match[1] not in api.experiments:
                        return self._reply(404, {"code": 5, "message": "experiment not found"})
                    name = api.experiments[match[1]]
                    return self._reply(200, {"experiment_id": match[1], "display_name": name})
                if path == "/runs":
                    return self._list_runs(query)
                if (match := re.fullmatch(r"/runs/([^/:]+)", path)) and (run := api.run(match[1])):
                    payload = run.as_json()
                    run.polls += 1
                    return self._reply(200, payload)
            return self._reply(404, {"code": 5, "message": f"no {path}"})

        def _list_runs(self, query: dict[str, list[str]]) -> None:
            experiment = query.get("experiment_id", [""])[0]
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
                if path == "/experiments":
                    experiment_id = uuid.uuid4().hex
                    api.experiments[experiment_id] = body["display_name"]
                    return self._reply(200, {"experiment_id": experiment_id,
                                             "display_name": body["display_name"]})
                if path == "/runs":
                    run = FakeRun(uuid.uuid4().hex, body["experiment_id"], body["display_name"], body,
                                  list(api.script(body["display_name"])), len(api.runs),
                                  {r.display_name: r.state for r in api.runs})
                    api.runs.append(run)
                    return self._reply(200, run.as_json())
                if (match := re.fullmatch(r"/runs/([^/:]+):terminate", path)) and (run := api.run(match[1])):
                    api.terminated.append(run.run_id)
                    run.states, run.polls = ["CANCELING", "FAILED"], 0
                    return self._reply(200, {})
            return self._reply(404, {"code": 5, "message": f"no {path}"})

    return Handler


@pytest.fixture
def kfp_api(tmp_path, monkeypatch) -> Iterator[FakeKfpApi]:
    """A fresh fake KFP API on 127.0.0.1; ``HOME`` points to an empty folder so no kfp context leaks in."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    api = FakeKfpApi()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
