"""Progress of an algorithm's rounds: a live bar on a terminal, one plain line per evaluation elsewhere.

A bar redraws itself with carriage returns, which in a log file, a CI job or a Kubernetes pod
becomes one enormous line; off a terminal each evaluated round gets its own short line instead.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from tqdm import tqdm


class RoundProgress:
    """Reports rounds ``first_round + 1 .. total`` of algorithm ``name`` on ``stream``."""

    def __init__(self, name: str, first_round: int, total: int, enabled: bool = True,
                 stream: IO[str] | None = None):
        self.name, self.total, self.enabled = name, total, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.perf_counter()
        self.bar: Any = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total, initial=first_round, desc=f"{name:>13}", unit="round",
                            file=self.stream, dynamic_ncols=True)

    def round_done(self, round_idx: int, metrics: dict[str, float]) -> None:
        """Round ``round_idx`` finished with ``metrics`` (``accuracy_mean`` when it was evaluated)."""
        if not self.enabled:
            return
        accuracy = metrics.get("accuracy_mean")
        if self.bar is not None:
            if accuracy is not None:
                self.bar.set_postfix(acc=f"{accuracy:.3f}", refresh=False)
            self.bar.update(1)
        elif accuracy is not None:
            seconds = time.perf_counter() - self.started
            self.stream.write(f"{self.name}: round {round_idx + 1}/{self.total}  accuracy {accuracy:.4f}  "
                              f"{seconds:.1f} s\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
