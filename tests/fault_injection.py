"""Client faults for tests, injected alike into the simulation and into kfp.local's step processes.

A fault spec maps clients to what goes wrong with their training, e.g. ``"1:raise,2:slow,3:diverge"``
or ``"*:raise@0"`` (every client, round 0 only):

- ``raise``:   the training raises (a lost GPU);
- ``slow``:    every batch takes longer than ``client_timeout`` (so the client runs past it after its
  first batch, however loaded the machine is);
- ``diverge``: the client trains with a learning rate 1e5 times too large, so its loss and update
  blow up for real (NaN or Inf).

``install(spec)`` wraps the client training the simulation calls (``pfedla.simulation.fit_client``)
in this process. Each kfp.local step is a fresh Python process, so ``sitecustomize_dir`` writes a
``sitecustomize.py`` that installs ``PFEDLA_TEST_FAULTS`` in every process started with it on
``PYTHONPATH``, there also in ``pfedla.rounds`` before the pipeline steps import it from there.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

ENV = "PFEDLA_TEST_FAULTS"


def parse(spec: str) -> list[tuple[str, str, int | None]]:
    faults = []
    for item in filter(None, spec.split(",")):
        client, _, rest = item.partition(":")
        kind, _, round_text = rest.partition("@")
        faults.append((client, kind, int(round_text) if round_text else None))
    return faults


def _fault(faults: list[tuple[str, str, int | None]], client_id: int, round_idx: int) -> str | None:
    for client, kind, only_round in faults:
        if client in ("*", str(client_id)) and only_round in (None, round_idx):
            return kind
    return None


def install(spec: str, step_processes: bool = False) -> None:
    """Wrap the real client training so the clients named in ``spec`` misbehave: in the simulation,
    and with ``step_processes`` (a fresh process) also where the pipeline steps import it from."""
    from pfedla import rounds, simulation

    faults, real_fit = parse(spec), simulation.fit_client

    def fit_client(rule, trainer, instruction, state, train, config, round_idx, client_id):
        kind = _fault(faults, client_id, round_idx)
        if kind == "raise":
            raise RuntimeError(f"injected: client {client_id} lost its GPU")
        if kind == "diverge":
            config = dataclasses.replace(config, lr=config.lr * 1e5)
        if kind != "slow":
            return real_fit(rule, trainer, instruction, state, train, config, round_idx, client_id)
        hook = trainer.model.register_forward_pre_hook(lambda *_: time.sleep(1.1 * config.client_timeout))
        try:
            return real_fit(rule, trainer, instruction, state, train, config, round_idx, client_id)
        finally:
            hook.remove()

    simulation.fit_client = fit_client
    if step_processes:
        rounds.fit_client = fit_client


def install_from_env() -> None:
    if os.environ.get(ENV):
        install(os.environ[ENV], step_processes=True)


def sitecustomize_dir(folder: Path) -> Path:
    """A folder whose ``sitecustomize.py`` installs ``$PFEDLA_TEST_FAULTS`` in every Python process."""
    folder.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent
    (folder / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(here)!r})\n"
        "import fault_injection\nfault_injection.install_from_env()\n")
    return folder
