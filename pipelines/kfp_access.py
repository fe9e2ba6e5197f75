"""How ``submit`` reaches a Kubeflow Pipelines API: single-user (standalone KFP) or multi-user Kubeflow.

Multi-user Kubeflow keeps experiments and runs in a profile namespace and wants a bearer token
with every request (KFP 2.17 reads ``Authorization: Bearer ...`` and checks it with a TokenReview,
backend/src/apiserver/auth/auth.go:37-41). The token comes from a file, read again before every
request as ``kfp.Client`` does for ``KF_PIPELINES_SA_TOKEN_PATH``, because the kubelet rotates
projected service account tokens: the ``--token-file`` given, else ``$KF_PIPELINES_SA_TOKEN_PATH``
(what Kubeflow sets in a notebook or pipeline pod), else kfp's default token path when it exists.
The token is never printed, logged or written: every error message is scrubbed of it.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kfp
from kfp import client as kfp_client
from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

from pfedla_pipelines.fl_pipeline import PipelineError

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
REDACTED = "***"


class AccessError(PipelineError):
    """The KFP API cannot be reached or refused a request; the message never holds the token."""


def default_token_file() -> Path | None:
    """The token file ``kfp.Client`` would use in a pod: ``$KF_PIPELINES_SA_TOKEN_PATH``, else kfp's
    default path if it exists there (kfp.client.set_volume_credentials)."""
    explicit = os.environ.get(kfp_client.KF_PIPELINES_SA_TOKEN_ENV)
    if explicit:
        return Path(explicit)
    default = Path(kfp_client.KF_PIPELINES_SA_TOKEN_PATH)
    return default if default.is_file() else None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())  # the API client's errors span lines (status, headers, body)


def read_token(path: Path) -> str:
    """The token in ``path``, stripped; an AccessError naming the file (never its content) otherwise."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not a text file"
        raise AccessError(f"cannot read the KFP API token from {path}: {reason}") from None
    if not token or any(c.isspace() for c in token):
        raise AccessError(f"the KFP API token file {path} must hold one token on one line")
    return token


class TokenFile(ServiceAccountTokenVolumeCredentials):
    """kfp's file-based bearer credentials, remembering every token it sent so messages can hide it."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path
        self.sent = {read_token(path)}  # checked now: a missing or empty file fails before any request

    def _get_token(self) -> str:
        token = read_token(self.path)
        self.sent.add(token)
        return token


@dataclass
class KfpApi:
    """A connected ``kfp.Client`` and what every call needs: where, which namespace, which secret to hide."""

    host: str
    namespace: str | None
    client: Any
    token: TokenFile | None = field(default=None, repr=False)

    @property
    def step_namespace(self) -> str:
        """Where the runs' pods are: the profile namespace, or standalone KFP's own."""
        return self.namespace or "kubeflow"

    def redact(self, text: str) -> str:
        for secret in self.token.sent if self.token else ():
            text = text.replace(secret, REDACTED)
        return text

    def call(self, what: str, request: Callable[[], Any]) -> Any:
        """``request()``; any failure becomes one AccessError line saying what failed, token removed."""
        try:
            return request()
        except Exception as error:
            raise AccessError(self.redact(f"the Kubeflow Pipelines API at {self.host} failed to {what}: "
                                          f"{_one_line(error)}")) from None


def connect(host: str, namespace: str | None = None, token_file: str | Path | None = None) -> KfpApi:
    """A client for the KFP API at ``host``: in ``namespace`` (multi-user Kubeflow) and with the
    bearer token of ``token_file`` or the pod's (see the module docstring) when there is one.
    Bad input is refused before any request."""
    if namespace is not None and not _DNS_LABEL.fullmatch(namespace):
        raise AccessError(f"invalid namespace {namespace!r}: a Kubeflow profile namespace is a DNS label "
                          "(a-z, 0-9, '-', at most 63 characters)")
    path = Path(token_file) if token_file is not None else default_token_file()
    api = KfpApi(host, namespace, None, TokenFile(path) if path is not None else None)
    options = {"namespace": namespace} if namespace else {}
    # The error line says what kfp's version warning and urllib3's retry lines would: keep them out.
    retries = logging.getLogger("urllib3.connectionpool")
    level = retries.level
    retries.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "only works with Kubeflow Pipeline v2.0.0-b..."
            api.client = kfp.Client(host=host, credentials=api.token, **options)
    except Exception as error:  # connection refused, DNS, TLS, auth: all surface here
        raise AccessError(api.redact(f"cannot reach the Kubeflow Pipelines API at {host}: "
                                     f"{_one_line(error)}")) from None
    finally:
        retries.setLevel(level)
    return api
