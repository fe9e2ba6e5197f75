#!/usr/bin/env python
"""pfedla performance benchmarks: prints a table, writes benchmarks/results/latest.json.

    python benchmarks/run.py [--quick | --tiny] [--only SECTION ...] [--results DIR]
                                                             (make bench / make bench QUICK=1)

Sections, one module each in benchmarks/ (``bench(settings)`` returns plain JSON data,
``table(result)`` its lines of the printed table; add new ones to ``SECTIONS``):

  server_step     the pFedLA server step (configure_fit + aggregate_fit, every client taking
                  part) against a naive reference that stacks all N state dicts per client,
                  on a paper-size CIFAR-10 CNN (~18M parameters)
  round_overhead  one default simulation round against the pure compute it contains
  scaling         synthetic data, N = 10, 100, 1000 clients at 10% participation
  pipeline_overhead  the pipeline under kfp.local against the same steps in-process
  data_movement   bytes per round through object storage at N=30 with the 18M CNN, before
                  (whole artifacts per pod) and after (the data plane)
  checkpointing   a checkpoint's share of simulation round time at N=30 with the 18M CNN,
                  for checkpoint_every = 1, 5, 10

What they share (settings, timing, peak memory, worker processes) is in common.py. Memory is
measured in a fresh subprocess per measurement (``run.py --worker``, dispatched through
``WORKERS``); timings are medians over repeats, and every comparison is measured in the same run.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning. With spinning threads, rounds made of many
# small ops ran 25-50x slower whenever other processes competed for the 2 cores (synthetic
# N=1000: 115-170 s per round instead of 3.3 s). It must be set before torch loads OpenMP;
# export OMP_WAIT_POLICY yourself to measure with another policy. Workers inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402

import checkpointing  # noqa: E402
import data_movement  # noqa: E402
import pipeline_overhead  # noqa: E402
import round_overhead  # noqa: E402
import scaling  # noqa: E402
import server_step  # noqa: E402
import torch  # noqa: E402
from common import RESULTS_DIR, THREADS, Settings, log  # noqa: E402

# Run and printed in this order.
SECTIONS: dict[str, ModuleType] = {
    "server_step": server_step,
    "round_overhead": round_overhead,
    "scaling": scaling,
    "pipeline_overhead": pipeline_overhead,
    "data_movement": data_movement,
    "checkpointing": checkpointing,
}

# spec["kind"] -> the function run_worker runs in a fresh interpreter (this file with --worker).
WORKERS: dict[str, Callable[[dict], dict]] = {
    "server_step": server_step.worker,
    "scaling": scaling.worker,
    "data_movement": data_movement.worker,
}


def format_table(results: dict) -> str:
    """The printed table: each section's lines, in ``SECTIONS`` order, for the sections that ran."""
    lines = []
    for name, section in SECTIONS.items():
        if results.get(name):
            lines += section.table(results[name])
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sections (or, with --worker, one worker spec) and report; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer repeats and rounds (a few minutes)")
    size.add_argument("--tiny", action="store_true",
                      help="every section at the smallest size that runs its code (what the tests run; "
                           "the numbers mean nothing)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR,
                        help="where latest.json and figures go (default: benchmarks/results)")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append",
                        help="run only these sections (repeatable)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)

    if args.worker:
        spec = json.loads(args.worker)
        Path(args.out).write_text(json.dumps(WORKERS[spec["kind"]](spec)))
        return 0

    settings = Settings.make("tiny" if args.tiny else "quick" if args.quick else "full", args.results)
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict = {
        "meta": {
            "mode": settings.mode,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": THREADS,
            "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
            "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "loadavg_start": os.getloadavg(),  # other work on the machine skews timings
        }
    }
    for name, section in SECTIONS.items():
        if args.only and name not in args.only:
            continue
        log(f"== {name}")
        section_started = time.perf_counter()
        results[name] = section.bench(settings)
        results[name]["section_seconds"] = time.perf_counter() - section_started
    results["meta"]["total_seconds"] = time.perf_counter() - started
    results["meta"]["loadavg_end"] = os.getloadavg()
    out = settings.results_dir / "latest.json"
    out.write_text(json.dumps(results, indent=2))
    print()
    print(format_table(results))
    print(f"\nwritten {out} in {results['meta']['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
