"""The run directory: identity, run.json checks, the writer lock, where a run may be written."""

import json
from pathlib import Path

import pytest

from cli_errors import error_line
from pfedla import rundir
from pfedla.cli import main
from pfedla.config import config_from_dict, experiment_key
from pfedla.errors import ArtifactError, PfedlaError


def test_identity_is_the_experiment_key_plus_a_nonce():
    config = config_from_dict({"clients": 3})
    first, second = rundir.new_identity(config), rundir.new_identity(config)
    assert first != second
    assert first.split("-")[0] == second.split("-")[0] == experiment_key(config)


@pytest.mark.parametrize("content, problem", [
    ("[1, 2]", "not a JSON object"),
    ('{"config": {}}', "no valid 'identity'"),
    ('{"identity": "../../etc", "config": {}}', "no valid 'identity'"),
    ('{"identity": "0123456789abcdef-01234567"}', "'config' is not an object"),
    ('{"identity": "0123456789abcdef-01234567", "config": {"clients": -4}}', "holds an invalid config"),
    ("{", "is not valid JSON"),
])
def test_a_damaged_run_json_is_one_error_line(tmp_path, capsys, content, problem):
    """On the old main a run.json without keys or not an object ended in a KeyError traceback."""
    (tmp_path / "run.json").write_text(content)
    with pytest.raises(ArtifactError, match=problem):
        rundir.read_record(tmp_path)
    assert main(["run", "--quiet", "--resume", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("pfedla: error: ") and problem in line


def test_output_locations_that_cannot_hold_a_run_are_refused_before_anything_is_written(tmp_path, capsys):
    """On the old main these were tracebacks (FileExistsError, PermissionError) or, for `/`, a run
    writing into the filesystem root."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = {str(a_file): "exists and is not a directory",
             str(a_file / "below"): "is not a directory",
             "/": "is the filesystem root",
             "/sys/pfedla-test-output": "cannot create output_dir"}  # refused even to root
    for output_dir, problem in cases.items():
        assert main(["run", "--quiet", "--set", f"output_dir={output_dir}", "--set", "rounds=1"]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("pfedla: error: ") and problem in line, output_dir
    assert a_file.read_text() == "x"


def test_a_second_writer_is_refused_while_the_first_holds_the_directory(tmp_path, capsys, monkeypatch):
    """On the old main two `--resume` of one directory both ran and logged every round twice."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    args = ["run", "--quiet", "--set", "clients=3", "--set", "rounds=1", "--set", "algorithms=[local]",
            "--set", f"output_dir={out}"]
    assert main(args) == 0
    (out / "summary.json").unlink()
    before = (out / "run.json").read_bytes()
    capsys.readouterr()
    with rundir.RunLock(out):  # another open file description: flock conflicts as across processes
        assert main(["run", "--quiet", "--resume", str(out)]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert f"{out} is in use by another pfedla run (pid " in line
        assert main(args + ["--overwrite"]) == 2
        assert (out / "run.json").read_bytes() == before
    assert main(["run", "--quiet", "--resume", str(out)]) == 0  # released: the lock is not stale


def test_resume_needs_a_run_json_and_creates_nothing(tmp_path):
    with pytest.raises(PfedlaError, match="cannot resume: .* does not exist"):
        rundir.check_state(tmp_path / "never", resume=True, overwrite=False)
    assert not (tmp_path / "never").exists()


def test_overwrite_removes_only_the_files_a_run_writes(tmp_path):
    ours = ["summary.json", "seed_0/partition.json", "seed_3/results/pfedla.json",
            "seed_3/models/pfedla.safetensors", "seed_0/checkpoints/pfedla.safetensors",
            "seed_0/layer_weights.npy", "seed_3/layer_weights_raw.npy"]
    others = ["seed_0/results/mine.json", "seed_0/layer_weights_extra.npy", "seed_7/results/pfedla.json",
              "results/pfedla.json", "notes.txt"]
    for name in ours + others:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    rundir.remove_outputs(tmp_path, rundir.seed_files(["pfedla"], [0, 3]))
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted(others)


def test_each_seed_writes_into_a_folder_of_its_own():
    files = rundir.seed_files(["pfedla", "local"], [0, 12])
    assert {f.split("/")[0] for f in files} == {"seed_0", "seed_12"}
    assert len(files) == len(set(files)) == 2 * (1 + 2 * 5)
    assert rundir.seed_dir(Path("out"), 12) == Path("out/seed_12")


def test_a_run_json_without_a_valid_identity_gets_advice_that_works(tmp_path, capsys, monkeypatch):
    """Issue 21, case 20: on main the advice was "start over with --overwrite", and --overwrite gave the
    same error (it needs the record to know which files it replaces)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    args = ["run", "--quiet", "--set", "clients=3", "--set", "rounds=1", "--set", "algorithms=[local]",
            "--set", f"output_dir={out}"]
    assert main(args) == 0
    record = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**record, "identity": "not-an-identity"}))
    capsys.readouterr()
    attempts = (args, args + ["--overwrite"], ["run", "--quiet", "--resume", str(out)], ["report", str(out)])
    for attempt in attempts:
        line = error_line(main(attempt), capsys.readouterr().err)
        assert "no valid 'identity'" in line and "--overwrite" not in line, attempt
        assert f"to start over in {out}, delete {out / 'run.json'}" in line
    (out / "run.json").unlink()  # the advice, followed
    assert main(args) == 0
    assert rundir.read_record(out).identity != record["identity"]
