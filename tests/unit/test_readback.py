"""Values read back from an output directory are checked against the run's own record before use
(issue 21, cases 12, 13, 14, 21): a resume and ``pfedla report`` accept only the algorithms and
seeds run.json records, numbers of the right type, finite and in range, and arrays shaped for the
run; anything else is one error line, and nothing is written from it."""

import json
import shutil
import unicodedata

import numpy as np
import pytest

from cli_errors import error_line
from pfedla.cli import main
from pfedla.config import config_from_dict
from pfedla.simulation import run_experiment

DEEP = "[" * 200_000 + "]" * 200_000


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("readback") / "out"
    config = config_from_dict({"clients": 3, "rounds": 2, "algorithms": ["pfedla", "local"], "device": "cpu",
                               "output_dir": str(out)})
    run_experiment(config, progress=False, track=False)
    return out


@pytest.fixture
def out(finished, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(finished, copy)
    return copy


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def summary_edit(change):
    return lambda out: edit_json(out / "summary.json", change)


def result_edit(change, name="local"):
    return lambda out: edit_json(out / "seed_0" / "results" / f"{name}.json", change)


def alpha(shape):
    def plant(out):
        np.save(out / "seed_0" / "layer_weights.npy", np.full(shape, 1.0 / max(shape[-1], 1)))
    return plant


def planted_name(out):
    """An algorithm name that is Markdown and HTML, with its results file planted beside the real ones."""
    name = "<img src=x onerror=alert(1)>\n# INJECTED"
    shutil.copy(out / "seed_0" / "results" / "local.json", out / "seed_0" / "results" / f"{name}.json")
    edit_json(out / "summary.json", lambda s: s.update({name: s.pop("local")}))


def zero_aliases(count):
    """``count`` spellings of seed 0 that ``int()`` reads as 0: Unicode decimal zeros, and runs of them."""
    zeros = [chr(c) for c in range(0x110000) if chr(c).isdecimal() and unicodedata.decimal(chr(c)) == 0]
    spellings = zeros + [a + b for a in zeros for b in zeros] + [a + b + c for a in zeros[:30] for b in zeros
                                                                for c in zeros]
    return [s for s in spellings if s != "0"][:count]


def unicode_seeds(summary):
    entry = summary["local"]["seeds"]["0"]
    summary["local"]["seeds"] = {"0": entry, **{alias: entry for alias in zero_aliases(20_000)}}


# Each damage, and what the one error line says. On main each of these was a traceback (case 13)
# or, for the last four (case 21), a report rendered without complaint.
DAMAGE = {
    "wall_seconds a string": (
        summary_edit(lambda s: s["local"].update(wall_seconds="fast")),
        "'local.wall_seconds' must be a finite number"),
    "mean_accuracy missing": (
        summary_edit(lambda s: s["local"].pop("mean_accuracy")),
        "'local.mean_accuracy' must be a finite number"),
    "client_accuracies a string": (
        summary_edit(lambda s: s["local"]["seeds"]["0"].update(client_accuracies="abc")),
        "'local.seeds.0.client_accuracies' must list one entry per client of the run (3), got 'abc'"),
    "seeds a list": (
        summary_edit(lambda s: s["local"].update(seeds=list(s["local"]["seeds"].values()))),
        "'local.seeds' must be a JSON object"),
    "alpha without layers": (
        alpha((3, 0, 3)), "holds shape (3, 0, 3), not the run's [clients, layers, clients]"),
    "alpha not square": (alpha((2, 4, 2)), "holds shape (2, 4, 2)"),
    "a history metric a string": (
        result_edit(lambda r: r["history"][0].update(accuracy_mean="abc")),
        "'history[0].accuracy_mean' must be a finite number in [0.0, 1.0], got 'abc'"),
    "bytes_up null": (
        result_edit(lambda r: r["history"][1].update(bytes_up=None)),
        "'history[1].bytes_up' must be a finite number in [0.0, inf], got None"),
    "a name that is Markdown": (
        planted_name,
        "lists algorithm '<img src=x onerror=alert(1)>\\n# INJECTED', which this run "
        "(run.json: pfedla, local) did not run"),
    "20,001 spellings of seed 0": (
        summary_edit(unicode_seeds), "'local.seeds' must name exactly the run's seeds 0, got 20001"),
    "alpha with more clients than the run": (alpha((5, 4, 5)), "holds shape (5, 4, 5), not the run's"),
    "deeply nested summary.json": (
        lambda out: (out / "summary.json").write_text(DEEP),
        "summary.json is not valid JSON: nested too deeply"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_report_of_a_damaged_run_is_one_error_line_and_writes_nothing(damage, out, capsys):
    change, expected = DAMAGE[damage]
    change(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    line = error_line(main(["report", str(out)]), capsys.readouterr().err)
    assert expected in line, line
    assert len(line) < 2100 and "INJECTED" not in (out / "report.md").read_text()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(("change", "expected"), [
    (lambda r: r.update(client_accuracies=[7.0, -3.0, 1e300]),
     "'client_accuracies[0]' must be a finite number in [0.0, 1.0], got 7.0"),
    (lambda r: r.update(mean_accuracy="0.9"),
     "'mean_accuracy' must be a finite number in [0.0, 1.0], got '0.9'"),
    (lambda r: r.update(rounds=10**400), "'rounds' must be the run's 2 rounds"),
    (lambda r: r.update(history=r["history"][:1]), "'history' must list the run's 2 rounds"),
])
def test_resume_refuses_a_finished_result_with_values_out_of_range(change, expected, out, capsys):
    """Case 12: on main accuracies [7.0, -3.0, 1e300] flowed into summary.json (std inf, a
    300-character table column), and a string there raised TypeError."""
    (out / "summary.json").unlink()
    edit_json(out / "seed_0" / "results" / "local.json", change)
    line = error_line(main(["run", "--quiet", "--resume", str(out)]), capsys.readouterr().err)
    damaged = out / "seed_0" / "results" / "local.json"
    assert f"{damaged} is damaged or from an older pfedla: {expected}" in line
    assert line.endswith("; start over with --overwrite")
    assert not (out / "summary.json").exists()


def test_resume_refuses_an_alpha_that_does_not_fit_the_run(out, capsys):
    (out / "summary.json").unlink()
    np.save(out / "seed_0" / "layer_weights.npy", np.full((3, 4, 3), np.nan))
    line = error_line(main(["run", "--quiet", "--resume", str(out)]), capsys.readouterr().err)
    assert "layer_weights.npy holds weights outside [0, 1] or not finite" in line


def test_deeply_nested_json_anywhere_it_is_read_is_one_error_line(out, tmp_path, capsys):
    """Case 14: on main ``json_from_bytes`` caught only ValueError, and this raised RecursionError."""
    (out / "run.json").write_text(DEEP)
    for command in (["report", str(out)], ["run", "--quiet", "--resume", str(out)]):
        line = error_line(main(command), capsys.readouterr().err)
        assert f"{out / 'run.json'} is not valid JSON: nested too deeply" in line
    (tmp_path / "deep.yaml").write_text(DEEP)
    line = error_line(main(["run", "--config", str(tmp_path / "deep.yaml")]), capsys.readouterr().err)
    assert "deep.yaml is not valid YAML: nested too deeply" in line
    line = error_line(main(["run", "--set", f"seeds={'[' * 5_000}"]), capsys.readouterr().err)
    assert "config key 'seeds': cannot parse value" in line


def test_a_path_with_line_breaks_or_escapes_stays_one_error_line(tmp_path, capsys):
    """Case 21: on main a missing directory named ``a\\nb`` gave a 3-line error (the path twice)."""
    for name in ("a\nb", "c\x1b[31md\r"):
        err = (main(["report", str(tmp_path / name)]), capsys.readouterr().err)
        line = error_line(*err)
        assert "holds no finished pfedla run" in line and "\x1b" not in line
    assert repr("\x1b")[1:-1] in line


def test_a_healthy_run_reads_back_unchanged(finished):
    """The checks accept what a run writes: every result and summary value is within its range."""
    from pfedla import readback

    config = config_from_dict(json.loads((finished / "run.json").read_text())["config"])
    summary = json.loads((finished / "summary.json").read_text())
    assert readback.check_summary(summary, "summary.json", config) == summary
    for name in config.algorithms:
        saved = json.loads((finished / "seed_0" / "results" / f"{name}.json").read_text())
        assert readback.check_result(saved, name, config) == saved
    assert readback.load_alpha(finished / "seed_0" / "layer_weights.npy", config).shape == (3, 4, 3)
