"""Progress output: a bar on a terminal, one plain line per evaluated round anywhere else."""

import io
import re

from pfedla.config import config_from_dict
from pfedla.progress import RoundProgress
from pfedla.simulation import run_experiment


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def report(stream, enabled=True):
    progress = RoundProgress("pfedla", 0, 5, enabled=enabled, stream=stream)
    for round_idx in range(5):
        evaluated = round_idx % 2 == 1 or round_idx == 4
        progress.round_done(round_idx, {"accuracy_mean": 0.5 + round_idx / 10} if evaluated else {})
    progress.close()
    return stream.getvalue()


def test_off_a_terminal_each_evaluated_round_is_one_plain_line():
    lines = report(io.StringIO()).splitlines()
    assert [re.sub(r"\d+\.\d s$", "T", line) for line in lines] == [
        "pfedla: round 2/5  accuracy 0.6000  T",
        "pfedla: round 4/5  accuracy 0.8000  T",
        "pfedla: round 5/5  accuracy 0.9000  T",
    ]


def test_on_a_terminal_it_is_a_bar_redrawn_in_place():
    drawn = report(Terminal())
    assert "\r" in drawn and "5/5" in drawn and "acc=0.900" in drawn
    assert drawn.count("\n") <= 1  # redrawn in place, finished with one newline


def test_disabled_progress_writes_nothing():
    assert report(io.StringIO(), enabled=False) == "" and report(Terminal(), enabled=False) == ""


def test_a_run_whose_stderr_is_a_log_file_writes_one_line_per_evaluation(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = config_from_dict({"clients": 3, "rounds": 4, "eval_every": 2, "device": "cpu",
                               "algorithms": ["local"], "output_dir": str(tmp_path / "out")})
    run_experiment(config, progress=True, track=False)
    err = capsys.readouterr().err  # captured: not a terminal
    assert "\r" not in err
    line = r"^local: round (\d)/4  accuracy [01]\.\d{4}  \d+\.\d s$"
    assert re.findall(line, err, re.MULTILINE) == ["2", "4"]
