#!/usr/bin/env bash
# Build the pfedla step image (CPU by default, CUDA with --cuda).
#
# The image reference has one source: the repository is STEP_IMAGE_REPOSITORY in
# src/pfedla/images.py and the tag is the version in pyproject.toml (plus "-cuda" for the
# CUDA variant). `--print` only prints that reference; tests check it equals
# pfedla.images.step_image().
#
# The engine: CONTAINER_ENGINE=docker|podman when set; else a docker daemon that answers (at
# DOCKER_HOST or its default socket); else podman; else the project's own engine
# (images/engine.sh), started for this build and stopped after it.
#
# The project's engine is for machines that reach a Debian mirror and PyPI but neither Docker Hub
# nor the PyTorch index (CI, the development machines). With it the defaults are `--base debian`
# and `--torch lock`, the build uses the host network, and the package files the host's pip keeps
# on disk are served to the build (images/wheel_cache.py) rather than downloaded again. Every build
# gets the host's CA bundle (PIP_CERT, else /etc/ssl/certs/ca-certificates.crt) for pip, as a
# BuildKit secret that does not stay in the image.
#
# Each build writes build/images/<variant>.json: the image, its size in bytes and how long the
# build (and a debootstrap base, if one was made) took.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEFAULT_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

usage() {
  cat <<'EOF'
usage: images/build.sh [--cuda] [--print] [--push] [--base IMAGE|debian] [--torch lock|URL]
                       [-- EXTRA_BUILD_ARGS...]

  --cuda         build images/Dockerfile.cuda (tag suffix -cuda) instead of images/Dockerfile
  --print        print the image reference and exit (no container engine needed)
  --push         push the image after building it
  --base IMAGE   the base image (BASE_IMAGE); "debian" builds one with images/debian-base.sh
  --torch lock   take torch from requirements/runtime.lock (PyPI's CUDA build, runs on CPU)
  --torch URL    take torch and torchvision from this package index (TORCH_INDEX_URL)
  Without --base/--torch the Dockerfile's defaults hold, except on the project's own engine
  (see the top of this script), where they are --base debian --torch lock.
  CONTAINER_ENGINE=docker|podman chooses the engine
EOF
}

die() {
  echo "build.sh: $*" >&2
  exit 1
}

# The [project] version of pyproject.toml, read the same way as pfedla.images.pyproject_version.
pyproject_version() {
  awk '
    /^\[/ { in_project = ($0 ~ /^\[project\][[:space:]]*$/); next }
    in_project && /^[[:space:]]*version[[:space:]]*=[[:space:]]*"/ {
      sub(/^[^"]*"/, ""); sub(/".*$/, ""); print; found = 1; exit
    }
    END { if (!found) exit 1 }
  ' "$1"
}

image_repository() {
  sed -n 's/^STEP_IMAGE_REPOSITORY = "\([^"]*\)"$/\1/p' "$1"
}

args=("$@")
variant=cpu
print_only=0
push=0
base=""
torch=""
extra=()
while (($#)); do
  case "$1" in
    --cuda) variant=cuda ;;
    --cpu) variant=cpu ;;
    --print) print_only=1 ;;
    --push) push=1 ;;
    --base | --torch)
      [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"
      if [[ "$1" == --base ]]; then base="$2"; else torch="$2"; fi
      shift
      ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "build.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
if [[ -n "$torch" && "$torch" != lock && ! "$torch" =~ ^https?:// ]]; then
  die "--torch takes 'lock' or an http(s) index URL, not '$torch'"
fi

version="$(pyproject_version "$ROOT/pyproject.toml")" || die "no version in the [project] table of $ROOT/pyproject.toml"
repository="$(image_repository "$ROOT/src/pfedla/images.py")"
[[ -n "$repository" ]] || die "STEP_IMAGE_REPOSITORY not found in $ROOT/src/pfedla/images.py"

if [[ "$variant" == cuda ]]; then
  image="$repository:$version-cuda"
  dockerfile="$ROOT/images/Dockerfile.cuda"
else
  image="$repository:$version"
  dockerfile="$ROOT/images/Dockerfile"
fi

if ((print_only)); then
  echo "$image"
  exit 0
fi

# -- the engine ------------------------------------------------------------------------------------
own_engine=0
engine="${CONTAINER_ENGINE:-}"
if [[ -n "$engine" ]]; then
  command -v "$engine" >/dev/null 2>&1 || die "CONTAINER_ENGINE=$engine is not on PATH"
elif [[ -n "${DOCKER_HOST:-}" && "$DOCKER_HOST" == "$("$BASH" "$ROOT/images/engine.sh" host)" ]]; then
  own_engine=1
  engine="$("$BASH" "$ROOT/images/engine.sh" cli)"
elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  engine=docker
elif command -v podman >/dev/null 2>&1; then
  engine=podman
elif command -v dockerd >/dev/null 2>&1; then
  # Start the project's engine, build with it (DOCKER_HOST is then its socket), stop it afterwards.
  exec "$BASH" "$ROOT/images/engine.sh" run -- "$BASH" "${BASH_SOURCE[0]}" ${args[@]+"${args[@]}"}
else
  die "neither docker nor podman answers here, and the project's own engine is not installed: start one, or run images/engine.sh install (as root, Debian) to build $image"
fi
if [[ "$(basename "$engine")" == docker ]]; then
  export DOCKER_BUILDKIT=1  # RUN --mount and build secrets need BuildKit
fi
if ((own_engine)); then
  base="${base:-debian}"
  torch="${torch:-lock}"
fi

# -- build arguments -------------------------------------------------------------------------------
build_args=(--file "$dockerfile" --tag "$image" --build-arg "PFEDLA_VERSION=$version")
base_seconds=0
if [[ "$base" == debian ]]; then
  started=$SECONDS
  base="$(DOCKER="$engine" "$BASH" "$ROOT/images/debian-base.sh")"
  base_seconds=$((SECONDS - started))
fi
if [[ -n "$base" ]]; then
  build_args+=(--build-arg "BASE_IMAGE=$base")
fi
if [[ "$torch" == lock ]]; then
  build_args+=(--build-arg "TORCH_INDEX_URL=")
elif [[ -n "$torch" ]]; then
  build_args+=(--build-arg "TORCH_INDEX_URL=$torch")
fi
# pip's configuration for the build goes in as BuildKit secrets (pip-conf, pip-ca): unlike build
# arguments they stay out of the image's history and do not change what the build cache reuses.
work="$(mktemp -d "${TMPDIR:-/tmp}/pfedla-build.XXXXXX")"
cache_pid=""
stop_cache() {  # it says how much it served as it stops
  if [[ -n "$cache_pid" ]]; then
    kill -TERM "$cache_pid" 2>/dev/null || true
    wait "$cache_pid" 2>/dev/null || true
    cache_pid=""
  fi
}
cleanup() {
  stop_cache
  rm -rf "$work"
}
trap cleanup EXIT
echo "[global]" >"$work/pip.conf"
ca_bundle="${PIP_CERT:-$DEFAULT_CA_BUNDLE}"
if [[ -r "$ca_bundle" ]]; then
  build_args+=(--secret "id=pip-ca,src=$ca_bundle")
  echo "cert = /run/secrets/pip-ca" >>"$work/pip.conf"
fi
if ((own_engine)); then
  # No bridge on this engine: builds share the host's network, which reaches PyPI and this cache.
  build_args+=(--network host)
  "${PYTHON:-python3}" "$ROOT/images/wheel_cache.py" serve "$work/port" &
  cache_pid=$!
  for _ in $(seq 100); do
    [[ -s "$work/port" ]] && break
    kill -0 "$cache_pid" 2>/dev/null || die "images/wheel_cache.py exited before serving"
    sleep 0.1
  done
  [[ -s "$work/port" ]] || die "images/wheel_cache.py did not start within 10 s"
  echo "extra-index-url = http://127.0.0.1:$(cat "$work/port")/simple/" >>"$work/pip.conf"
fi
build_args+=(--secret "id=pip-conf,src=$work/pip.conf")

# -- build -----------------------------------------------------------------------------------------
echo "build.sh: building $image with $engine from ${dockerfile#"$ROOT"/}" \
  "(base: ${base:-default}, torch: ${torch:-default})" >&2
started=$SECONDS
"$engine" build "${build_args[@]}" ${extra[@]+"${extra[@]}"} "$ROOT"
seconds=$((SECONDS - started))
stop_cache
bytes="$("$engine" image inspect --format '{{.Size}}' "$image")"
mkdir -p "$ROOT/build/images"
printf '{"image": "%s", "bytes": %s, "build_seconds": %s, "base": "%s", "base_seconds": %s, "torch": "%s"}\n' \
  "$image" "$bytes" "$seconds" "${base:-default}" "$base_seconds" "${torch:-default}" \
  >"$ROOT/build/images/$variant.json"
echo "build.sh: built $image in $seconds s (base $base_seconds s): $((bytes / 1000000)) MB" >&2

if ((push)); then
  "$engine" push "$image"
fi
echo "$image"
