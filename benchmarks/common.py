"""What the benchmark sections share: settings, timing, memory measurement, worker processes."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# The four splits the studies compare on the MNIST comparison config, as config overrides.
SPLITS = {
    "iid": ["partition.kind=iid"],
    "dir0.5": ["partition.kind=dirichlet", "partition.alpha=0.5"],
    "dir0.1": ["partition.kind=dirichlet", "partition.alpha=0.1"],
    "path2": ["partition.kind=pathological", "partition.classes_per_client=2"],
}

THREADS = 2
RESULTS_DIR = Path(__file__).resolve().parent / "results"  # run.py --results chooses another
ENTRY_POINT = Path(__file__).resolve().parent / "run.py"  # dispatches --worker specs to run.WORKERS
MIB = 2**20
# Paper-style CIFAR-10 CNN: conv 3->64->128 (5x5), fc 8192->2176->10: 18,059,530 parameters.
PAPER_CNN = {"width": 64, "hidden": 2176}
# --quick: the same CNN with a quarter of fc1 (4,672,234 parameters), so the naive reference
# at N=30 takes well under a minute.
QUICK_CNN = {"width": 64, "hidden": 544}
# --tiny: a CNN of a few thousand parameters; the numbers mean nothing, the code paths are all run.
TINY_CNN = {"width": 4, "hidden": 16}
MODES = ("full", "quick", "tiny")


@dataclass(frozen=True)
class Settings:
    """How much work each section does: full (make bench), quick (make bench QUICK=1), or tiny (the
    test suite runs every section this way, so a change that breaks a section fails the tests)."""

    mode: str = "full"
    results_dir: Path = RESULTS_DIR
    server_model: tuple[tuple[str, int], ...] = tuple(PAPER_CNN.items())
    server_clients: tuple[int, ...] = (10, 30)
    server_repeats: int = 3
    # A measurement stops repeating once another repeat would take it past this many
    # seconds (at least one repeat always runs): keeps `make bench` under 15 minutes.
    server_budget_s: float = 240.0
    overhead_rounds: int = 15
    scaling_clients: tuple[int, ...] = (10, 100, 1000)
    scaling_rounds: int = 3
    pipeline_rounds: int = 2  # pipeline_overhead's experiment
    pipeline_clients: int = 4
    movement_clients: int = 30  # data_movement: CIFAR-10 split over 30 clients, 2,000 images each
    movement_images: int = 2000
    checkpoint_clients: int = 30
    checkpoint_images: int = 2000  # images one client trains on in checkpointing's round
    startup_repeats: int = 5  # step_startup: probe steps per runner, and client steps timed
    # step_startup's container half (the step image on a container engine). Tiny mode, which the test
    # suite runs without any engine, leaves it out; make test-images runs it at tiny size.
    startup_containers: bool = True
    startup_clients: int | None = None  # the yardstick's clients; None: the default config's

    @classmethod
    def make(cls, mode: str, results_dir: Path = RESULTS_DIR) -> Settings:
        """The settings of ``mode``: full, quick (smaller CNN, fewer repeats and rounds) or tiny."""
        if mode == "quick":
            return cls(mode, results_dir, server_model=tuple(QUICK_CNN.items()), server_repeats=1,
                       overhead_rounds=5, scaling_rounds=1, pipeline_rounds=1, pipeline_clients=3,
                       checkpoint_images=500, startup_repeats=2)
        if mode == "tiny":
            return cls(mode, results_dir, server_model=tuple(TINY_CNN.items()), server_clients=(3,),
                       server_repeats=1, server_budget_s=10.0, overhead_rounds=1, scaling_clients=(10,),
                       scaling_rounds=1, pipeline_rounds=1, pipeline_clients=2, movement_clients=3,
                       movement_images=8, checkpoint_clients=3, checkpoint_images=8, startup_repeats=1,
                       startup_containers=False, startup_clients=2)
        if mode != "full":
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        return cls(mode, results_dir)


def log(message: str) -> None:
    """A timestamped progress line, flushed so it shows up while a section runs."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def median_seconds(fn: Callable[[], object], repeats: int, budget_s: float = float("inf")
                   ) -> tuple[float, list[float]]:
    """Median wall time of up to ``repeats`` calls; stops early when the next would exceed the budget."""
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) + times[-1] <= budget_s):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def timed_into(fn: Callable, totals: dict[str, float], key: str) -> Callable:
    """``fn``, adding the wall time of every call to ``totals[key]``."""
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - started
    return wrapper


# --------------------------------------------------------------------------- memory


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{key} not in /proc/self/status")


def _release_free_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only: return freed heap to the OS
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRss:
    """Peak RSS of this process during a ``with`` block, above the RSS it entered with.

    Meant for a fresh process that does only the workload: earlier peaks (imports, setup)
    are cleared through /proc/self/clear_refs so ru_maxrss restarts from the current RSS.
    """

    def __enter__(self) -> PeakRss:
        _release_free_memory()
        self.setup_peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.baseline_mib = _status_mib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            self.reset = True
        except OSError:
            self.reset = False  # ru_maxrss then also covers setup: an upper bound
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.delta_mib = self.peak_mib - self.baseline_mib

    def as_dict(self) -> dict[str, float | bool]:
        """The measurement as JSON data, in MiB."""
        return {
            "baseline_rss_mb": round(self.baseline_mib, 1),
            "peak_rss_mb": round(self.peak_mib, 1),
            "peak_delta_mb": round(self.delta_mib, 1),
            "setup_peak_rss_mb": round(self.setup_peak_mib, 1),
            "peak_reset": self.reset,
        }


def run_worker(spec: dict) -> dict:
    """Run ``spec`` in a fresh interpreter (run.py --worker, which looks up ``spec["kind"]`` in
    its ``WORKERS``) and return its result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([sys.executable, str(ENTRY_POINT), "--worker", json.dumps(spec), "--out", str(out)],
                       check=True)
        return json.loads(out.read_text())


def measured_sizes(result: dict) -> list[tuple[str, dict]]:
    """A section result's rows keyed by the size measured (N or S), as the tables print them."""
    return [(key, row) for key, row in result.items() if key.isdigit()]
