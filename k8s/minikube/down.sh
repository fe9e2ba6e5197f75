#!/usr/bin/env bash
# Delete the minikube profile made by k8s/minikube/up.sh. k8s/base/secrets.env is kept.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/../lib.sh
source "$HERE/../lib.sh"

PROFILE="${PFEDLA_MINIKUBE_PROFILE:-pfedla}"

pfedla_require minikube "install minikube (https://minikube.sigs.k8s.io/docs/start/)"
pfedla_log "deleting minikube profile $PROFILE"
minikube delete --profile "$PROFILE"
