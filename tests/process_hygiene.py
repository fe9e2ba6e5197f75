"""Pytest plugin: a test run leaves no process behind.

When the session starts, the pytest process becomes a child subreaper (Linux
``prctl(PR_SET_CHILD_SUBREAPER)``): every process a test starts stays its descendant, even when
the process that started it is gone (a server's worker whose server alone was killed, a daemon
that forked away). When the session ends, after every fixture's teardown, any descendant still
running fails the run: it is named with its command line, then killed. Exited ones are reaped.
Python's own multiprocessing helpers (resource tracker, forkserver) end with the interpreter and
are not counted. Elsewhere than Linux the check is skipped, with a note.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
# children of the interpreter itself, gone when it exits
INTERPRETER_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    command: str


def processes() -> list[Proc]:
    """Every process /proc lists, with its parent, state and command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        command = cmdline.replace(b"\0", b" ").decode(errors="replace").strip() or stat.split(" ", 1)[1]
        found.append(Proc(int(entry.name), int(ppid), state, command))
    return found


def descendants(root: int) -> list[Proc]:
    """The processes below ``root``, nearest first."""
    table = processes()
    children: dict[int, list[Proc]] = {}
    for proc in table:
        children.setdefault(proc.ppid, []).append(proc)
    found, frontier = [], [root]
    while frontier:
        below = [child for pid in frontier for child in children.get(pid, [])]
        found += below
        frontier = [child.pid for child in below]
    return found


def leftovers(root: int) -> list[Proc]:
    """Descendants of ``root`` still running (zombies and interpreter helpers excluded)."""
    return [p for p in descendants(root) if p.state != "Z"
            and not any(helper in p.command for helper in INTERPRETER_HELPERS)]


def reap(root: int, timeout: float = 5.0) -> None:
    """Collect ``root``'s exited descendants (they come to it as their parents exit), for up to
    ``timeout`` seconds while a killed one is still shutting down."""
    deadline = time.monotonic() + timeout
    while True:
        zombies = [p for p in descendants(root) if p.state == "Z" and p.ppid == root]
        for proc in zombies:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, os.WNOHANG)
        if (not zombies and not leftovers(root)) or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def become_subreaper() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_ENABLED] = become_subreaper()


_ENABLED = pytest.StashKey[bool]()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if not session.config.stash.get(_ENABLED, False):
        if reporter:
            reporter.write_line("process hygiene: not checked (needs Linux /proc and prctl)")
        return
    me = os.getpid()
    survivors = leftovers(me)
    for proc in survivors:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    if survivors:
        reap(me)
    if survivors:
        lines = [f"  pid {p.pid}: {p.command[:300]}" for p in survivors]
        if reporter:
            reporter.write_sep("=", "processes started by tests were still running (now killed)", red=True)
            for line in lines:
                reporter.write_line(line)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
