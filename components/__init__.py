"""Kubeflow components: thin typed wrappers over ``pfedla.steps`` (no math here).

Each module holds one step's function; ``build_components`` turns them into KFP
components for a given step image. The functions import pfedla inside their bodies
because KFP ships each function's source to the container on its own. Every artifact is a
small JSON manifest (bulk tensors live in the data plane, see ``pfedla.dataplane``), and its
metadata is the step's summary: finite numbers, strings and booleans only, which is all the
cluster's launcher accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kfp import dsl

from pfedla_components.checkpoint import checkpoint
from pfedla_components.client_train import client_train
from pfedla_components.evaluate import evaluate
from pfedla_components.partition import partition
from pfedla_components.record import record
from pfedla_components.server import server_init, server_round


@dataclass(frozen=True)
class Components:
    """The pipeline's components, all built for one step image."""

    partition: Any
    server_init: Any
    client_train: Any
    server_round: Any
    evaluate: Any
    checkpoint: Any
    record: Any


def build_components(image: str) -> Components:
    """KFP components running in ``image``, which must contain pfedla (and thus kfp)."""

    def component(func: Any) -> Any:
        return dsl.component(func, base_image=image, install_kfp_package=False)

    return Components(
        partition=component(partition),
        server_init=component(server_init),
        client_train=component(client_train),
        server_round=component(server_round),
        evaluate=component(evaluate),
        checkpoint=component(checkpoint),
        record=component(record),
    )
