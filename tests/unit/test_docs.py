"""The documentation stays true: the configuration reference lists exactly the keys the config
accepts with their real defaults, and every local link in README.md and docs/ resolves."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pfedla import registry
from pfedla.config import ExperimentConfig, _flatten

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "configuration.md"
ROW = re.compile(r"^\| `([a-z0-9_.]+)` \| ([^|]*) \| [^|]+ \|$")
DOCUMENTS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A repository path in a code span: `src/pfedla/rounds.py`, `k8s/base/` (not patterns like <s> or *)
REPO_PATH = re.compile(r"`((?:src|tests|benchmarks|docs|k8s|images|configs|pipelines|components|requirements)"
                       r"/[^`\s*<>]*)`")


def documented() -> dict[str, str]:
    rows: dict[str, str] = {}
    for line in REFERENCE.read_text().splitlines():
        if match := ROW.match(line):
            key, default = match.groups()
            assert key not in rows, f"{key} is documented twice"
            rows[key] = default.strip()
    return rows


def as_documented(value) -> str:
    """How the reference writes a default: – for none, YAML-like values in backticks."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return f"`[{', '.join(map(str, value))}]`"
    if value == "":
        return '`""`'
    return f"`{value}`"


def test_the_reference_lists_exactly_the_accepted_keys_with_their_defaults():
    defaults = _flatten(ExperimentConfig().to_dict())
    rows = documented()
    assert sorted(set(defaults) - set(rows)) == [], "keys the config accepts but docs/configuration.md lacks"
    assert sorted(set(rows) - set(defaults)) == [], "keys docs/configuration.md lists but the config lacks"
    wrong = {key: (rows[key], as_documented(value)) for key, value in defaults.items()
             if rows[key] != as_documented(value)}
    assert wrong == {}, "documented default != the code's default"


def test_the_reference_names_every_registered_algorithm_and_section():
    text = REFERENCE.read_text()
    (algorithms_row,) = [line for line in text.splitlines() if line.startswith("| `algorithms` |")]
    listed = re.findall(r"`([a-z0-9_]+)`", algorithms_row.split("|")[3])
    assert listed == list(registry.algorithm_names()), "the algorithms row differs from the registry"
    documented_sections = {key.partition(".")[0] for key in documented() if "." in key}
    assert set(registry.sections()) <= documented_sections


def test_the_checker_catches_a_missing_key_and_a_wrong_default(tmp_path, monkeypatch):
    text = REFERENCE.read_text()
    monkeypatch.setattr(sys.modules[__name__], "REFERENCE", tmp_path / "configuration.md")
    (tmp_path / "configuration.md").write_text(text.replace("| `pfedla.heur_k` | `0` |",
                                                                  "| `pfedla.heur_k` | `1` |"))
    with pytest.raises(AssertionError, match="heur_k"):
        test_the_reference_lists_exactly_the_accepted_keys_with_their_defaults()
    (tmp_path / "configuration.md").write_text(re.sub(r"\n\| `lr` \|[^\n]*", "", text))
    with pytest.raises(AssertionError, match="lacks"):
        test_the_reference_lists_exactly_the_accepted_keys_with_their_defaults()


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_local_links_resolve(document):
    for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", document.read_text()):
        assert (document.parent / target).exists(), f"{document.name} links to missing {target}"


def git_ignored(path: str) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_repository_paths_the_docs_name_exist(document):
    """A path in a code span exists, or is one the project ignores (an output, a user's secrets file)."""
    missing = [path for path in REPO_PATH.findall(document.read_text())
               if not (ROOT / path).exists() and not git_ignored(path)]
    assert missing == [], f"{document.name} names paths that do not exist"
