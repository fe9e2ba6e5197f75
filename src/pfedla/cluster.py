"""What a Kubeflow Pipelines 2.17 cluster (Argo Workflows v4.0.5) does with a step that fails.

Facts read in the sources of kubeflow/pipelines 2.17.0 and the argo-workflows release its
manifests pin; docs/reliability.md says which failures are retried.

Argo backs off ``duration * factor**(n - 1)`` seconds before retry ``n``
(workflow/controller/operator.go:1054-1069) and gives up once the next attempt would start, or an
attempt would still run, past the first attempt's start plus ``backoff.maxDuration``
(operator.go:1025-1095; later attempts get that instant as their deadline). KFP compiles
``maxDuration`` from ``set_retry(backoff_max_duration=...)``, 3600 s when it is not given
(kfp/dsl/structures.py RetryPolicy.to_proto), which cut a client pod's retries short as soon as
its timeout was longer than about half an hour.
"""

from __future__ import annotations

CLIENT_RETRY_BACKOFF_SECONDS = 30
CLIENT_RETRY_BACKOFF_FACTOR = 2  # Argo reads the factor as an integer (util/intstr): 1.5 would fail the node
# Per attempt, on top of its run time: scheduling, pulling the step image onto a fresh (GPU) node and
# the launcher downloading the step's inputs all happen before activeDeadlineSeconds starts counting.
POD_START_ALLOWANCE_SECONDS = 600
# The window when nothing bounds an attempt (no pod timeout, no segment timeout): 30 days.
UNBOUNDED_RETRY_WINDOW_SECONDS = 30 * 24 * 3600


def retry_backoffs(retries: int) -> int:
    """Seconds Argo waits in total before ``retries`` retries of one pod."""
    return sum(CLIENT_RETRY_BACKOFF_SECONDS * CLIENT_RETRY_BACKOFF_FACTOR**n for n in range(retries))


def client_retry_window(retries: int, pod_timeout: int, segment_timeout: int = 0) -> int:
    """Seconds from a client pod's first attempt within which all ``retries + 1`` attempts fit.

    Each attempt may run ``pod_timeout`` seconds after a start-up allowance, and the backoffs come
    between them. Without a pod timeout no attempt is bounded: the window is the segment's own
    deadline, or 30 days when there is none either.
    """
    if pod_timeout <= 0:
        return segment_timeout if segment_timeout > 0 else UNBOUNDED_RETRY_WINDOW_SECONDS
    return (retries + 1) * (pod_timeout + POD_START_ALLOWANCE_SECONDS) + retry_backoffs(retries)
