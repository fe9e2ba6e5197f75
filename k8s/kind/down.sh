#!/usr/bin/env bash
# Delete the kind cluster made by k8s/kind/up.sh (everything in it, including MLflow runs
# and S3 objects). k8s/base/secrets.env is kept for the next cluster.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/../lib.sh
source "$HERE/../lib.sh"

CLUSTER="${PFEDLA_KIND_CLUSTER:-pfedla}"

pfedla_require kind "install kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  pfedla_log "deleting kind cluster $CLUSTER"
  kind delete cluster --name "$CLUSTER"
else
  pfedla_log "no kind cluster named $CLUSTER: nothing to delete"
fi
