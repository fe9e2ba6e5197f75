"""Every benchmark section runs to the end at a tiny size, so a change that breaks one fails the tests
(the numbers are meaningless at this size; `make bench` measures)."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from run import SECTIONS  # noqa: E402


def test_every_section_runs_at_a_tiny_size(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "run.py"), "--tiny", "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["meta"]["mode"] == "tiny"
    assert sorted(name for name in results if name != "meta") == sorted(SECTIONS)
    for name, section in SECTIONS.items():  # each section's table is printed from its result
        assert all(line in proc.stdout for line in section.table(results[name]) if line)
    assert (tmp_path / "scaling.png").is_file()  # figures go to --results too, not into the checkout
