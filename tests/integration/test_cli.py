"""`pfedla` command line: it parses, calls the library, and reports errors without tracebacks."""


import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from pfedla.cli import main

PASSWORD = "s3cret-PW-7d1e"


def test_a_run_tracked_with_a_password_in_the_uri_never_prints_it(tmp_path, capsys, monkeypatch,
                                                                    mlflow_server):
    """The real mlflow server (no auth of its own: it ignores the credentials requests sends)."""
    uri = mlflow_server.tracking_uri.replace("http://", f"http://alice:{PASSWORD}@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")  # pfedla sets it; undone after
    code = main(["run", "--quiet", "--set", "clients=2", "--set", "rounds=1", "--set", "algorithms=[local]",
                 "--set", f"output_dir={tmp_path / 'out'}", "--set", f"experiment_name=pw-{tmp_path.name}"])
    printed = capsys.readouterr()
    assert code == 0 and PASSWORD not in printed.out + printed.err
    assert "tracking: http://alice:***@127.0.0.1:" in printed.out


def stored_files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (the lock file's pid aside)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".pfedla.lock"}


def test_a_failing_or_unasked_fresh_run_leaves_a_stored_run_exactly_as_it_was(tmp_path, capsys, monkeypatch):
    """On the old main a fresh run into a finished directory replaced it without --overwrite, and one
    that then failed (bad data_dir, too many clients, unreachable tracker) had already deleted its
    results and rewritten run.json."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    args = ["run", "--quiet", "--set", "clients=3", "--set", "rounds=2", "--set", f"output_dir={out}",
            "--set", "algorithms=[local]"]
    assert main(args) == 0
    (out / "seed_0" / "results" / "notes.json").write_text("{}")  # not pfedla's: must survive everything
    finished = stored_files(out)
    capsys.readouterr()
    assert main(args) == 2
    assert f"{out} holds a finished run: choose another output_dir, or replace it with --overwrite" in \
        capsys.readouterr().err
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    failing = {
        "data_dir": (["--set", "dataset=mnist", "--set", f"data_dir={tmp_path / 'nowhere'}"], {},
                     "does not exist"),
        "clients": (["--set", "clients=1500"], {}, "too few for 1500 clients"),
        "tracker": ([], {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}, "MLflow at http://127.0.0.1"),
    }
    for case, (extra, env, expected) in failing.items():
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert main(args + extra + ["--overwrite"]) == 2, case
        assert expected in capsys.readouterr().err, case
        for key in env:
            monkeypatch.delenv(key)
        assert stored_files(out) == finished, case
    assert main(args + ["--set", "seed=1", "--overwrite"]) == 0
    assert (out / "seed_0" / "results" / "notes.json").read_text() == "{}"
    assert json.loads((out / "run.json").read_text())["config"]["seed"] == 1


def test_a_fresh_run_refuses_to_wipe_an_unfinished_one_unless_told(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    args = ["run", "--quiet", "--set", "clients=3", "--set", "rounds=2", "--set", f"output_dir={out}",
            "--set", "algorithms=[local]"]
    assert main(args) == 0
    (out / "summary.json").unlink()  # what an interrupted run looks like
    unfinished = stored_files(out)
    capsys.readouterr()
    assert main(args) == 2
    refused = capsys.readouterr().err
    assert f"{out} holds an unfinished run: continue it with `pfedla run --resume {out}`" in refused
    assert stored_files(out) == unfinished
    assert main(args + ["--overwrite"]) == 0 and (out / "summary.json").is_file()
    identity = json.loads((out / "run.json").read_text())["identity"]
    assert [p.name for p in (out / "checkpoints" / "rounds").iterdir()] == [identity]  # the old run's went


def test_an_unreachable_tracking_server_is_one_error_line_without_its_password(tmp_path):
    """With MLflow's default retries (none of its MLFLOW_HTTP_REQUEST_* settings): on 42ac5ca a dead
    port took 257 s and printed 7 urllib3 retry warnings before the error line. The bound on the
    time is a sanity bound of the error path, far above the probe's 10 s, not a performance claim."""
    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_HTTP_REQUEST")}
    env["MLFLOW_TRACKING_URI"] = f"http://alice:{PASSWORD}@127.0.0.1:{port}"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pfedla.cli", "run", "--quiet", "--set", "clients=2", "--set", "rounds=1",
         "--set", "algorithms=[local]", "--set", f"output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert time.monotonic() - started < 120
    assert result.returncode == 2, result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith(f"pfedla: error: MLflow at http://alice:***@127.0.0.1:{port} failed to answer: ")
    assert not (tmp_path / "out").exists()
