"""pipeline_overhead: the pipeline under kfp.local against the same steps called in-process.

Both runs do the same rounds and clients on digits; the difference per task is what the
orchestration (a Python process per task) costs.
"""

from __future__ import annotations

import builtins
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common import Settings, log

from pfedla.config import ExperimentConfig, config_from_dict


def bench(settings: Settings) -> dict:
    """kfp.local run of the pipeline vs the same steps called in-process, and vs pure training."""
    # Imported when the section runs: run.py imports every section module, in each worker process
    # too, and pfedla_pipelines brings in kfp (over a thousand modules).
    from pfedla import steps
    from pfedla_pipelines.runner import run_local

    rounds, clients = settings.pipeline_rounds, settings.pipeline_clients
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = config_from_dict({"clients": clients, "rounds": rounds, "device": "cpu",
                                   "algorithms": ["pfedla"], "output_dir": str(root / "out"),
                                   "pipeline": {"data_root": str(root / "plane")}})
        cfg = config.to_json()
        log(f"pipeline_overhead: {rounds} round(s), {clients} clients in-process")
        started = time.perf_counter()
        training = 0.0
        shards, plan = root / "shards", root / "plan0"
        steps.partition(cfg, shards)
        steps.server_init(cfg, shards, plan)
        for round_idx in range(rounds):
            updates = []
            for client in range(clients):
                updates.append(root / f"u{round_idx}_{client}")
                began = time.perf_counter()
                steps.client_train(cfg, str(client), plan, updates[-1])
                training += time.perf_counter() - began
            steps.server_round(cfg, round_idx, round_idx + 1 < rounds, shards, plan, updates,
                               root / f"plan{round_idx + 1}")
            plan = root / f"plan{round_idx + 1}"
        steps.evaluate(cfg, shards, plan, root / "final", root / "evaluation", final=True)
        steps.checkpoint(cfg, root / "final", root / "checkpoint")
        in_process = time.perf_counter() - started
        tasks = 5 + rounds * (1 + clients)  # partition, init, evaluate, checkpoint, record + per round
        log(f"pipeline_overhead: the same {tasks} tasks through kfp.local")
        original_print = builtins.print  # kfp.local patches print during ParallelFor
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        started = time.perf_counter()
        try:
            run_local(replace_data_root(config, root / "plane-kfp"), root / "kfp")
        finally:
            builtins.print = original_print
        local_s = time.perf_counter() - started
    return {
        "rounds": rounds, "clients": clients, "tasks": tasks,
        "kfp_local_s": local_s, "in_process_steps_s": in_process, "training_s": training,
        "orchestration_s_per_task": (local_s - in_process) / tasks,
        "share_outside_training": 1 - training / local_s,
        "note": "kfp.local starts a Python process per task (imports torch and pfedla each time); "
                "in_process_steps_s excludes the record step's MLflow logging",
    }


def replace_data_root(config: ExperimentConfig, data_root: Path) -> ExperimentConfig:
    """``config`` with its pipeline's data plane under ``data_root``."""
    return replace(config, pipeline=replace(config.pipeline, data_root=str(data_root)))


def table(result: dict) -> list[str]:
    """The section's lines of the printed table, ending with a blank separator line."""
    return [
        f"pipeline overhead: {result['tasks']} tasks ({result['rounds']} round(s), "
        f"{result['clients']} clients) under kfp.local {result['kfp_local_s']:.1f} s, "
        f"same steps in-process {result['in_process_steps_s']:.1f} s",
        f"  orchestration {result['orchestration_s_per_task']:.2f} s per task; "
        f"{100 * result['share_outside_training']:.0f}% of the local run is spent outside training",
        "",
    ]
