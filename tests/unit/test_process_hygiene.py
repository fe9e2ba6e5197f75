"""The session-end check of tests/process_hygiene.py: a test run that leaves a process running fails.

Each case runs a small pytest session of its own (a real one, in a subprocess) with the plugin.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from process_hygiene import descendants, leftovers

TESTS = Path(__file__).resolve().parents[1]
LEAKING = '''
import subprocess

def test_starts_a_server_and_loses_it():
    # a shell starts the "server" in the background and exits: the server outlives its parent
    subprocess.run(["sh", "-c", "sleep 300 & echo $! > leaked.pid"], check=True)
'''
CLEAN = '''
import subprocess

def test_starts_and_stops_a_server():
    server = subprocess.Popen(["sleep", "300"])
    server.kill()
    server.wait()
'''


def _session(folder: Path, source: str) -> subprocess.CompletedProcess[str]:
    (folder / "test_case.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "process_hygiene", "-p", "no:cacheprovider",
               "test_case.py"]
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux /proc and prctl")


def test_a_session_that_leaves_a_process_running_fails_names_it_and_kills_it(tmp_path):
    proc = _session(tmp_path, LEAKING)
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout  # the test itself passed: the session check failed the run
    assert "processes started by tests were still running" in proc.stdout and "sleep 300" in proc.stdout
    pid = int((tmp_path / "leaked.pid").read_text())
    assert not _running(pid)


def test_a_session_that_stops_what_it_started_passes(tmp_path):
    proc = _session(tmp_path, CLEAN)
    assert proc.returncode == pytest.ExitCode.OK, proc.stdout + proc.stderr


def test_an_orphaned_grandchild_stays_a_descendant_of_this_session(tmp_path):
    """This session is a subreaper too: a process whose parent exits is still found."""
    subprocess.run(["sh", "-c", f"sleep 300 & echo $! > {tmp_path / 'pid'}"], check=True)
    pid = int((tmp_path / "pid").read_text())
    try:
        assert pid in {p.pid for p in leftovers(os.getpid())}
    finally:
        os.kill(pid, 9)
    deadline = time.monotonic() + 5
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(pid)
    assert pid not in {p.pid for p in leftovers(os.getpid())}
    assert all(p.pid != os.getpid() for p in descendants(os.getpid()))
