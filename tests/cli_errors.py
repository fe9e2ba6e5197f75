"""What a user error looks like from outside: exit code 2, one ``pfedla: error: ...`` line, no traceback."""

import os
import subprocess
import sys


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m pfedla.cli ARGS`` in a fresh process, so an escaping exception shows as a traceback."""
    return subprocess.run([sys.executable, "-m", "pfedla.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def error_line(code: int, stderr: str) -> str:
    """The single error line of a failed command; fails unless the failure has the promised shape."""
    assert "Traceback" not in stderr, stderr
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("pfedla: error: "), stderr
    return lines[0]
