"""Every file pfedla writes stays inside the directory it belongs to: written to a new temporary
file created exclusively, renamed into place, never through a symbolic link (issue 21, cases 1-3).

The writers below (a run replacing a finished one, a resume, ``pfedla report``) each meet
symbolic links planted at the names they write and at the folders they write in; whatever they
do, no file outside the directory may change. Each writer is one entry of ``WRITERS``: a new
writer of an output directory (the pipeline's ``run-local``) joins by adding its entry.
"""

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli_errors import error_line
from pfedla import storage
from pfedla.cli import main
from planted_links import plant_file_link, snapshot

RUN = ["--set", "clients=3", "--set", "rounds=2", "--set", "algorithms=[pfedla, local]"]
# Names where pfedla refuses a link instead of replacing it: the lock (held open, never renamed)
# and what MLflow's local store writes itself (sqlite follows links; so does its artifact copy).
REFUSED = (".pfedla.lock", "mlflow.db", "mlartifacts/")


def files(folder: Path) -> list[str]:
    return [str(path.relative_to(folder)) for path in sorted(folder.rglob("*"))
            if path.is_file() and not path.is_symlink()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished `pfedla run` with its local MLflow store (its copies must not write here either)."""
    base = tmp_path_factory.mktemp("base") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert main(["run", "--quiet", *RUN, "--set", f"output_dir={base}"]) == 0
    return base


@dataclass(frozen=True)
class Writer:
    """One way pfedla writes an output directory: how to prepare it from a finished run, the
    command, and which of the finished run's files the command writes again."""

    prepare: Callable[[Path], None]
    command: Callable[[Path], list[str]]
    rewrites: Callable[[str], bool]


def unfinished(out: Path) -> None:
    (out / "summary.json").unlink()
    (out / "seed_0" / "results" / "local.json").unlink()


WRITERS = {
    "overwrite": Writer(lambda out: None, lambda out: ["run", "--quiet", *RUN, "--set", f"output_dir={out}",
                                                       "--overwrite"],
                        lambda name: not name.startswith("checkpoints/rounds/")),  # new identity, new folder
    "resume": Writer(unfinished, lambda out: ["run", "--quiet", "--resume", str(out)],
                     lambda name: name in ("run.json", "summary.json", "report.md", "seed_0/partition.json",
                                           "seed_0/results/local.json", "seed_0/models/local.safetensors")),
    "report": Writer(lambda out: None, lambda out: ["report", str(out)],
                     lambda name: name == "report.md" or name.startswith("figures/")),
}


@pytest.fixture
def copy_of(finished, tmp_path):
    """A fresh copy of the finished run prepared for a writer, and the folder of its victims."""
    def make(writer: Writer, name: str = "out") -> tuple[Path, Path]:
        out = tmp_path / name
        shutil.copytree(finished, out, symlinks=True)
        writer.prepare(out)
        return out, tmp_path / f"outside-{name}"
    return make


def outside_state(finished: Path, outside: Path) -> dict:
    """What must not change: the victims, and the finished run the copy was made from."""
    return {"victims": snapshot(outside), "original": snapshot(finished)}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_links_at_the_files_a_writer_writes_are_replaced_and_never_followed(
        writer, finished, copy_of, capsys, monkeypatch):
    """On main a link at ``<name>.partial`` received the file's bytes (storage.write_bytes wrote the
    partial name through it), then the rename made ``<name>`` a link to the victim."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = WRITERS[writer]
    out, outside = copy_of(spec)
    names = [name for name in files(finished) if not name.startswith(REFUSED)]
    for index, name in enumerate(names):
        plant_file_link(out, outside, name, index)
    before = outside_state(finished, outside)
    assert main(spec.command(out)) == 0, capsys.readouterr().err
    assert outside_state(finished, outside) == before
    rewritten = [name for name in names if spec.rewrites(name)]
    assert "report.md" in rewritten
    for name in rewritten:  # renamed into place: the link itself was replaced
        assert (out / name).is_file() and not (out / name).is_symlink(), name
    assert not [p for p in out.rglob("*.partial") if not p.is_symlink()]  # no temporary file left


def folders_written(finished: Path, writer: str) -> list[str]:
    """The folders below the output directory that ``writer`` writes in (report: figures/ only)."""
    if writer == "report":
        return ["figures"]
    names = {str(Path(name).parent) for name in files(finished)} - {"."}
    return sorted({str(Path(*Path(name).parts[:depth])) for name in names
                   for depth in range(1, len(Path(name).parts) + 1)})


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_link_at_a_folder_a_writer_writes_in_is_refused_and_nothing_outside_changes(
        writer, finished, copy_of, capsys, monkeypatch):
    """On main a linked ``figures/`` received the report's figures, a linked ``seed_0/`` the run's
    results, and --overwrite deleted the replaced run's files through it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = WRITERS[writer]
    folders = folders_written(finished, writer)
    assert "figures" in folders and (writer == "report" or {"seed_0/results", "mlartifacts"} <= set(folders))
    for index, folder in enumerate(folders):
        out, outside = copy_of(spec, f"out-{index}")
        outside.mkdir()
        shutil.move(out / folder, outside / "moved")  # readers find what they expect through the link
        (out / folder).symlink_to(outside / "moved", target_is_directory=True)
        before = outside_state(finished, outside)
        code = main(spec.command(out))
        line = error_line(code, capsys.readouterr().err)
        assert "is a symbolic link" in line, (folder, line)
        assert outside_state(finished, outside) == before, folder


@pytest.mark.parametrize("name", [".pfedla.lock", "mlflow.db", "mlflow.db-journal"])
def test_a_link_at_the_lock_or_the_tracking_store_is_refused_before_anything_is_written(
        name, finished, copy_of, capsys, monkeypatch):
    """On main a linked .pfedla.lock was truncated to ``pid N``, even by a run then refused because
    the directory held a finished run; sqlite writes through a linked mlflow.db or journal."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out, outside = copy_of(WRITERS["overwrite"])
    outside.mkdir()
    (outside / "victim").write_bytes((out / name).read_bytes() if (out / name).is_file() else b"victim")
    (out / name).unlink(missing_ok=True)
    (out / name).symlink_to(outside / "victim")
    before, inside = outside_state(finished, outside), snapshot(out)
    inside.pop(".pfedla.lock")  # the holder's pid
    command = WRITERS["overwrite"].command(out)
    # the lock comes first: even a run refused because the directory holds a finished run takes it
    for args in [command, command[:-1]] if name == ".pfedla.lock" else [command]:
        line = error_line(main(args), capsys.readouterr().err)
        assert f"{out / name} is a symbolic link" in line
        assert outside_state(finished, outside) == before
        assert {k: v for k, v in snapshot(out).items() if k != ".pfedla.lock"} == inside


def test_a_hard_linked_lock_file_is_refused(finished, copy_of, capsys):
    out, outside = copy_of(WRITERS["overwrite"])
    outside.mkdir()
    (outside / "victim").write_text("precious\n")
    (out / ".pfedla.lock").unlink()
    os.link(outside / "victim", out / ".pfedla.lock")
    line = error_line(main(["run", "--quiet", "--resume", str(out)]), capsys.readouterr().err)
    assert "is not a plain file of its own" in line
    assert (outside / "victim").read_text() == "precious\n"


def test_report_refuses_an_algorithm_name_that_climbs_out_of_the_directory(finished, tmp_path, capsys):
    """Issue 21, case 1: on main the name ``q/../../../../ESCAPED`` in summary.json, with folders
    planted so that its lookups succeed, made the report write ``ESCAPED_seed_0.png`` two levels
    above the output directory."""
    out = tmp_path / "a" / "b" / "out"
    shutil.copytree(finished, out, symlinks=True)
    name = "q/../../../../ESCAPED"
    summary = json.loads((out / "summary.json").read_text())
    summary = {name if key == "pfedla" else key: value for key, value in summary.items()}
    (out / "summary.json").write_text(json.dumps(summary))
    for folder in ("seed_0/results/q", "seed_0/layer_weights_q", "figures/alpha_q"):
        (out / folder).mkdir(parents=True)
    # where the climbing lookups land: results/q/../../../../ESCAPED.json and layer_weights_q/../...
    shutil.copy(out / "seed_0" / "results" / "pfedla.json", out.parent / "ESCAPED.json")
    shutil.copy(out / "seed_0" / "layer_weights.npy", out.parent.parent / "ESCAPED.npy")
    before = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("a/b/out")}
    line = error_line(main(["report", str(out)]), capsys.readouterr().err)
    assert f"lists algorithm {name!r}, which this run (run.json: pfedla, local) did not run" in line
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("a/b/out")} == before
    assert not list(tmp_path.rglob("ESCAPED_seed_0.png"))


# -- the storage layer itself --------------------------------------------------------------------------

def test_write_bytes_replaces_a_link_at_its_name_and_never_writes_through_one(tmp_path):
    """On main ``write_bytes`` wrote ``<name>.partial`` through a link planted there."""
    folder, victim = tmp_path / "folder", tmp_path / "victim"
    folder.mkdir()
    victim.write_bytes(b"precious")
    for planted in ("report.md", "report.md.partial"):
        (folder / planted).symlink_to(victim)
    storage.write_bytes(folder / "report.md", b"new")
    assert victim.read_bytes() == b"precious"
    assert (folder / "report.md").read_bytes() == b"new" and not (folder / "report.md").is_symlink()


def test_write_bytes_refuses_a_linked_folder_below_its_root_and_a_name_outside_it(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    elsewhere.mkdir()
    root.mkdir()
    (root / "figures").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(storage.StorageError, match="figures is a symbolic link"):
        storage.write_bytes(root / "figures" / "a.png", b"x", root=root)
    with pytest.raises(storage.StorageError, match="is a symbolic link"):
        storage.delete(root / "figures" / "a.png", root=root)
    for escaping in (root / "x" / ".." / ".." / "escaped", tmp_path / "escaped"):
        with pytest.raises(storage.StorageError, match="is not a file inside"):
            storage.write_bytes(escaping, b"x", root=root)
    assert list(elsewhere.iterdir()) == [] and not (tmp_path / "escaped").exists()
    storage.write_bytes(root / "new" / "deeper" / "a.png", b"x", root=root)  # real folders are created
    assert (root / "new" / "deeper" / "a.png").read_bytes() == b"x"


def test_a_failed_write_keeps_the_previous_content_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "summary.json"
    path.write_bytes(b"before")

    def failing(out):
        out.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        storage.write_local(path, failing)
    assert path.read_bytes() == b"before" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_the_folders_a_run_writes_besides_its_files_are_checked_too(tmp_path):
    """A seed's data cache (an s3:// data_dir is downloaded into it) and the checkpoint folders of
    the run being replaced: a link at any of them stops the run before anything is written."""
    from pfedla import rundir
    from pfedla.errors import PfedlaError

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    identity = "0123456789abcdef-01234567"
    folders = rundir.written_folders(identity, ["local"], [3])
    assert {"seed_3/data-cache", f"checkpoints/rounds/{identity}/seed_3/local"} <= set(folders)
    for folder in ("seed_3/data-cache", f"checkpoints/rounds/{identity}", "checkpoints"):
        out = tmp_path / f"out-{folder.count('/')}-{len(folder)}"
        (out / folder).parent.mkdir(parents=True, exist_ok=True)
        (out / folder).symlink_to(elsewhere, target_is_directory=True)
        with pytest.raises(PfedlaError, match=f"{out / folder} is a symbolic link"):
            rundir.check_no_links(out, [], folders)
