#!/usr/bin/env bash
# The project's own container engine: Debian's docker.io, one private dockerd per state folder.
#
# For machines without a running docker or podman (CI, the development machines): the engine
# listens on a socket of its own, keeps its images and containers under PFEDLA_ENGINE_DIR
# (outside the repository), has no default bridge and touches no iptables, so every build and
# container uses the host network. It is started and stopped by the PID in its pidfile.
set -euo pipefail

DIR="${PFEDLA_ENGINE_DIR:-/var/tmp/pfedla-engine}"
SOCKET="$DIR/docker.sock"
PIDFILE="$DIR/docker.pid"
LOG="$DIR/dockerd.log"
# Debian's docker.io ships its own CLI here; another `docker` earlier on PATH may be a newer CLI
# that needs the buildx plugin for BuildKit builds, which this engine's CLI has built in.
CLI=/usr/bin/docker
PACKAGES=(docker.io debootstrap)

usage() {
  cat <<EOF
usage: images/engine.sh install|start|stop|status|env|run -- COMMAND...

  install   apt-get install those of ${PACKAGES[*]} that are missing (root, Debian)
  start     start dockerd on unix://$SOCKET unless it runs already
  stop      stop the dockerd whose PID is in $PIDFILE
  status    exit 0 when that dockerd answers, 1 otherwise
  env       print the variables a client needs (eval "\$(images/engine.sh env)")
  host      print its DOCKER_HOST (unix://...)
  cli       print the path of its docker CLI
  run       start the engine if needed, run COMMAND with DOCKER_HOST set, and stop the
            engine afterwards if this call started it
  PFEDLA_ENGINE_DIR chooses the state folder (default /var/tmp/pfedla-engine)
EOF
}

die() {
  echo "engine.sh: $*" >&2
  exit 1
}

installed() {
  [[ -z "$(missing)" ]]
}

# Only what is missing: where Docker's own packages (docker-ce) provide dockerd and the CLI already,
# docker.io, which conflicts with them, is not asked for.
missing() {
  command -v dockerd >/dev/null 2>&1 && [[ -x "$CLI" ]] || echo docker.io
  command -v debootstrap >/dev/null 2>&1 || echo debootstrap
}

install() {
  local wanted
  mapfile -t wanted < <(missing)
  ((${#wanted[@]})) || return 0
  [[ "$(id -u)" == 0 ]] || die "installing ${wanted[*]} needs root"
  command -v apt-get >/dev/null 2>&1 || die "installing ${wanted[*]} needs apt-get (Debian or Ubuntu)"
  echo "engine.sh: installing ${wanted[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${wanted[@]}" >/dev/null
}

pid() {
  [[ -s "$PIDFILE" ]] && cat "$PIDFILE"
}

alive() {
  local p
  p="$(pid)" || return 1
  [[ "$(cat "/proc/$p/comm" 2>/dev/null)" == dockerd ]]
}

answers() {
  alive && DOCKER_HOST="unix://$SOCKET" "$CLI" version >/dev/null 2>&1
}

start() {
  if answers; then
    return 0
  fi
  installed || die "$(missing | paste -sd ' ') not installed: run images/engine.sh install (as root)"
  [[ "$(id -u)" == 0 ]] || die "dockerd needs root"
  if alive; then
    die "dockerd $(pid) runs but does not answer on $SOCKET; see $LOG"
  fi
  mkdir -p "$DIR/data" "$DIR/exec"
  # setsid: the engine outlives the shell that started it (a make recipe, a test session)
  setsid dockerd -H "unix://$SOCKET" --data-root "$DIR/data" --exec-root "$DIR/exec" --pidfile "$PIDFILE" \
    --bridge=none --iptables=false >"$LOG" 2>&1 </dev/null &
  local waited=0
  until answers; do
    if ((waited >= 120)); then
      tail -n 20 "$LOG" >&2
      die "dockerd did not answer on $SOCKET within 60 s"
    fi
    sleep 0.5
    waited=$((waited + 1))
  done
  echo "engine.sh: dockerd $(pid) answers on unix://$SOCKET (state in $DIR)" >&2
}

stop() {
  alive || return 0
  local p waited=0
  p="$(pid)"
  kill -TERM "$p"
  while [[ -e "/proc/$p" ]]; do
    if ((waited >= 60)); then
      echo "engine.sh: dockerd $p did not stop within 30 s; killing it" >&2
      kill -KILL "$p"
      break
    fi
    sleep 0.5
    waited=$((waited + 1))
  done
  # dockerd leaves its default network namespace mounted under the exec root; only mounts inside
  # this engine's own folder are touched.
  awk -v dir="$DIR/" 'index($2, dir) == 1 { print $2 }' /proc/mounts | sort -r | while read -r mounted; do
    umount "$mounted"
  done
  echo "engine.sh: stopped dockerd $p" >&2
}

env_lines() {
  echo "export DOCKER_HOST=unix://$SOCKET"
  echo "export DOCKER_BUILDKIT=1"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) answers ;;
  env) env_lines ;;
  host) echo "unix://$SOCKET" ;;
  cli) echo "$CLI" ;;
  run)
    shift
    [[ "${1:-}" == -- ]] && shift
    (($#)) || die "run needs a command"
    started=0
    if ! answers; then
      start
      started=1
    fi
    status=0
    DOCKER_HOST="unix://$SOCKET" DOCKER_BUILDKIT=1 "$@" || status=$?
    if ((started)); then
      stop
    fi
    exit "$status"
    ;;
  -h | --help) usage ;;
  *) usage >&2; exit 2 ;;
esac
