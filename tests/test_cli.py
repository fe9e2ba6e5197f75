"""`pfedla` command line: it parses, calls the library, and reports errors without tracebacks."""

import json
import subprocess
import sys

from pfedla.cli import main


def test_run_prints_the_table_and_where_outputs_are(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    code = main(["run", "--quiet", "--set", "clients=3", "--set", "rounds=1", "--set", f"output_dir={out}",
                 "--set", "algorithms=[local, fedavg]"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "algorithm" in printed and "local" in printed and "fedavg" in printed
    assert f"mlflow ui --backend-store-uri sqlite:///{out.resolve()}/mlflow.db" in printed
    assert set(json.loads((out / "summary.json").read_text())) == {"local", "fedavg"}


def test_bad_config_fails_before_any_work(tmp_path):
    out = tmp_path / "never"
    result = subprocess.run(
        [sys.executable, "-m", "pfedla.cli", "run", "--set", "clients=1", "--set", f"output_dir={out}"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "config key 'clients': need at least 2 clients" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err
