#!/usr/bin/env bash
# Create (or reuse) a kind cluster, install the pinned standalone Kubeflow Pipelines,
# load the step image if it was built, deploy k8s/overlays/kind and print the endpoints.
#
#   k8s/kind/up.sh            # or: make kind-up
#   PFEDLA_KIND_CLUSTER=name  cluster name (default: pfedla)
#   PFEDLA_KFP_VERSION=x.y.z  Kubeflow Pipelines release (default: see k8s/lib.sh)
#   KIND_EXPERIMENTAL_PROVIDER=podman  run kind on podman instead of docker
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/../lib.sh
source "$HERE/../lib.sh"

CLUSTER="${PFEDLA_KIND_CLUSTER:-pfedla}"

pfedla_require kind "install kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)"
if [[ "${KIND_EXPERIMENTAL_PROVIDER:-docker}" == podman ]]; then
  pfedla_require podman "KIND_EXPERIMENTAL_PROVIDER=podman needs podman"
else
  pfedla_require docker "kind runs its nodes as docker containers: install docker (or set KIND_EXPERIMENTAL_PROVIDER=podman)"
  docker info >/dev/null 2>&1 || pfedla_die "docker is installed but its daemon is not reachable: start docker"
fi
PFEDLA_KUBECTL="$(pfedla_find_kubectl)"
PFEDLA_KUBE_CONTEXT="kind-$CLUSTER"

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  pfedla_log "reusing kind cluster $CLUSTER"
else
  pfedla_log "creating kind cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --config "$HERE/kind-config.yaml" --wait 180s
fi

pfedla_install_kfp
pfedla_load_step_image kind load docker-image --name "$CLUSTER"
pfedla_deploy "$PFEDLA_K8S_DIR/overlays/kind"
pfedla_print_endpoints
