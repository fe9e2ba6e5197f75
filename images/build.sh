#!/usr/bin/env bash
# Build the pfedla step image (CPU by default, CUDA with --cuda) with docker or podman.
#
# The image reference has one source: the repository is STEP_IMAGE_REPOSITORY in
# src/pfedla/images.py and the tag is the version in pyproject.toml (plus "-cuda" for the
# CUDA variant). `--print` only prints that reference; tests check it equals
# pfedla.images.step_image().
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
usage: images/build.sh [--cuda] [--print] [--push] [-- EXTRA_BUILD_ARGS...]

  --cuda    build images/Dockerfile.cuda (tag suffix -cuda) instead of images/Dockerfile
  --print   print the image reference and exit (no container engine needed)
  --push    push the image after building it
  CONTAINER_ENGINE=docker|podman chooses the engine (default: docker, else podman)
EOF
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

variant=cpu
print_only=0
push=0
extra=()
while (($#)); do
  case "$1" in
    --cuda) variant=cuda ;;
    --cpu) variant=cpu ;;
    --print) print_only=1 ;;
    --push) push=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "build.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

version="$(pyproject_version "$ROOT/pyproject.toml")" || {
  echo "build.sh: no version in the [project] table of $ROOT/pyproject.toml" >&2
  exit 1
}
repository="$(image_repository "$ROOT/src/pfedla/images.py")"
if [[ -z "$repository" ]]; then
  echo "build.sh: STEP_IMAGE_REPOSITORY not found in $ROOT/src/pfedla/images.py" >&2
  exit 1
fi

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

engine="${CONTAINER_ENGINE:-}"
if [[ -z "$engine" ]]; then
  if command -v docker >/dev/null 2>&1; then
    engine=docker
  elif command -v podman >/dev/null 2>&1; then
    engine=podman
  else
    echo "build.sh: neither docker nor podman is on PATH; install one of them to build $image" >&2
    exit 1
  fi
elif ! command -v "$engine" >/dev/null 2>&1; then
  echo "build.sh: CONTAINER_ENGINE=$engine is not on PATH" >&2
  exit 1
fi

echo "build.sh: building $image with $engine from ${dockerfile#"$ROOT"/}" >&2
"$engine" build \
  --file "$dockerfile" \
  --tag "$image" \
  --build-arg "PFEDLA_VERSION=$version" \
  ${extra[@]+"${extra[@]}"} \
  "$ROOT"

if ((push)); then
  "$engine" push "$image"
fi
echo "$image"
