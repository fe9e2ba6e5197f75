"""`pfedla` command line: it parses, calls the library, and reports errors without tracebacks."""

import json
import re
import subprocess
import sys

import pytest

from cli_errors import error_line
from pfedla.cli import main
from pfedla.errors import without_credentials


def test_run_prints_the_table_and_where_outputs_are(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    code = main(["run", "--quiet", "--set", "clients=3", "--set", "rounds=1", "--set", f"output_dir={out}",
                 "--set", "algorithms=[local, fedavg]"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "algorithm" in printed and "local" in printed and "fedavg" in printed
    assert f"mlflow ui --backend-store-uri sqlite:///{out.resolve()}/mlflow.db" in printed
    identity = json.loads((out / "run.json").read_text())["identity"]
    assert f"run:      {identity} (run.json; MLflow tag pfedla.run)" in printed
    assert set(json.loads((out / "summary.json").read_text())) == {"local", "fedavg"}


def test_run_over_several_seeds_prints_mean_and_spread(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    assert main(["run", "--quiet", "--set", "clients=3", "--set", "rounds=1", "--set", f"output_dir={out}",
                 "--set", "algorithms=[local]", "--set", "seeds=[0, 1]"]) == 0
    printed = capsys.readouterr().out
    entry = json.loads((out / "summary.json").read_text())["local"]
    (row,) = [line for line in printed.splitlines() if line.startswith("local ")]
    assert row.split()[1:7] == [f"{entry['mean_accuracy']:.4f}", "±", f"{entry['mean_accuracy_std']:.4f}",
                                f"{entry['client_mean_accuracy']:.4f}", "±",
                                f"{entry['client_mean_accuracy_std']:.4f}"]
    assert "mean ± sample standard deviation over seeds" in printed
    assert (out / "report.md").is_file()
    assert sorted(p.name for p in out.glob("seed_*")) == ["seed_0", "seed_1"]


def test_the_pipeline_runs_one_seed_and_refuses_several(tmp_path, capsys):
    args = ["pipeline", "compile", "--set", "pipeline.data_root=s3://pfedla", "--set", "rounds=2"]
    code = main([*args, "--set", "seeds=[0, 1]", "-o", str(tmp_path / "two.yaml")])
    assert error_line(code, capsys.readouterr().err) == (
        "pfedla: error: config key 'seeds': the pipeline runs one seed, got 2 ([0, 1]): run one pipeline per "
        "seed with seed=<s>, or use `pfedla run` for several")
    assert not (tmp_path / "two.yaml").exists()
    for name, setting in (("one", "seeds=[3]"), ("plain", "seed=3")):
        assert main([*args, "--set", setting, "-o", str(tmp_path / f"{name}.yaml")]) == 0
    # a one-entry seeds list is that seed: the same pipeline as seed=3
    assert (tmp_path / "one.yaml").read_text() == (tmp_path / "plain.yaml").read_text()


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


def test_deploy_without_a_cluster_is_a_clear_error(tmp_path, capsys, monkeypatch):
    """No Kubernetes API server can run here: this checks the error path of `pfedla deploy`."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    code = main(["deploy", "--overlay", "kind", "--kubeconfig", str(tmp_path / "missing"),
                 "--wait-timeout", "0"])
    assert code == 2
    assert "no Kubernetes cluster reachable" in capsys.readouterr().err


def test_pipeline_compile_reports_size_and_the_segments(tmp_path, capsys):
    output = tmp_path / "p.yaml"
    code = main(["pipeline", "compile", "--set", "rounds=5", "--set", "pipeline.rounds_per_run=2",
                 "--set", "pipeline.data_root=s3://pfedla", "-o", str(output)])
    printed = capsys.readouterr().out
    assert code == 0 and output.is_file()
    assert "rounds 0..1 of 5" in printed
    assert "segment 1 of 3: `pfedla pipeline submit` runs them all in turn" in printed
    assert re.search(r"largest pod strings: ARGO_TEMPLATE [\d,]+ KiB \(.+\), executor input [\d,]+ KiB",
                     printed)
    assert re.search(r"Workflow estimate, \d+ pods and \d+ nodes: spec [\d,]+ KiB, node status [\d,]+ KiB; "
                     r"the object [\d,]+ KiB before Argo's compression, [\d,]+ KiB after; refused past "
                     r"614 KiB \(60% of MAX_WORKFLOW_SIZE 1,024 KiB\)", printed)
    assert main(["pipeline", "compile", "-o", str(tmp_path / "missing" / "p.yaml"),
                 "--set", "pipeline.data_root=s3://pfedla"]) == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["parallelism", "client_retries", "gpus_per_client", "client_pod_timeout",
                                 "segment_timeout"])
def test_pipeline_compile_refuses_integers_kubernetes_cannot_hold(tmp_path, capsys, key):
    """On the old main protobuf or the int32 check of activeDeadlineSeconds raised "Value out of range"
    (a traceback) for 10**20, and 2**31 GPUs or a 2**31 s pod deadline compiled into a YAML."""
    output = tmp_path / "p.yaml"
    for value in (2**31, 10**20):
        code = main(["pipeline", "compile", "--set", "pipeline.data_root=s3://pfedla", "--set",
                     f"pipeline.{key}={value}", "-o", str(output)])
        line = error_line(code, capsys.readouterr().err)
        assert line.startswith(f"pfedla: error: config key 'pipeline.{key}': must be at most ")
        assert line.endswith(f", got {value}")
        assert not output.exists()


@pytest.mark.parametrize(
    ("name", "problem"),
    [("pipeline", "the pipeline file's name must end in .yaml or .yml"),
     ("pipeline.json", "the pipeline file's name must end in .yaml or .yml"),
     ("x" * 300 + ".yaml", "File name too long"),
     ("folder.yaml", "Is a directory")])
def test_pipeline_compile_to_an_unwritable_output_is_one_error_line(tmp_path, capsys, name, problem):
    (tmp_path / "folder.yaml").mkdir()
    output = tmp_path / name
    code = main(["pipeline", "compile", "--set", "pipeline.data_root=s3://pfedla", "-o", str(output)])
    assert error_line(code, capsys.readouterr().err) == f"pfedla: error: cannot write {output}: {problem}"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["folder.yaml"]


def test_credentials_in_urls_are_masked():
    assert without_credentials("to http://u:pw@h:5/x and s3://key:secret@bucket/p") == \
        "to http://u:***@h:5/x and s3://key:***@bucket/p"
    assert without_credentials("http://h:5000/api https://user@h/") == "http://h:5000/api https://user@h/"


# SIGKILLs `pfedla pipeline compile` after half of the YAML has reached its file: kfp writes the
# document with yaml.dump_all into the open file, so the kill lands inside that write.
KILLED_MID_WRITE = """
import os, signal, sys
import yaml
dump_all = yaml.dump_all
def half_then_kill(documents, stream, **options):
    text = dump_all(documents, None, **options)
    stream.write(text[: len(text) // 2])
    stream.flush()
    os.kill(os.getpid(), signal.SIGKILL)
yaml.dump_all = half_then_kill
from pfedla.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_pipeline_compile_killed_mid_write_leaves_the_previous_yaml_whole(tmp_path):
    """Issue 21, case 19: on main a compile killed mid-write left a truncated YAML under the final
    name (and a truncated YAML of many rounds still parses)."""
    import signal

    output = tmp_path / "pipeline.yaml"
    args = ["pipeline", "compile", "--set", "pipeline.data_root=s3://pfedla", "-o", str(output)]
    assert main([*args, "--set", "rounds=2"]) == 0
    previous = output.read_bytes()
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, *args, "--set", "rounds=8"],
                            capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert output.read_bytes() == previous
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pipeline.yaml"]  # nothing left beside it
