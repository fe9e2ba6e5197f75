#!/usr/bin/env bash
# minikube equivalent of k8s/kind/up.sh: start (or reuse) a profile with a CNI that
# enforces NetworkPolicies, install the pinned standalone Kubeflow Pipelines, load the
# step image if it was built, deploy k8s/overlays/kind and print the endpoints.
#
#   PFEDLA_MINIKUBE_PROFILE=name   profile (default: pfedla)
#   PFEDLA_MINIKUBE_CPUS / _MEMORY  node size (default: 4 CPUs, 8g)
#   PFEDLA_MINIKUBE_DRIVER          e.g. docker, podman, kvm2 (default: minikube's choice)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/../lib.sh
source "$HERE/../lib.sh"

PROFILE="${PFEDLA_MINIKUBE_PROFILE:-pfedla}"

pfedla_require minikube "install minikube (https://minikube.sigs.k8s.io/docs/start/)"
PFEDLA_KUBECTL="$(pfedla_find_kubectl)"
PFEDLA_KUBE_CONTEXT="$PROFILE"

if minikube status --profile "$PROFILE" >/dev/null 2>&1; then
  pfedla_log "reusing minikube profile $PROFILE"
else
  pfedla_log "starting minikube profile $PROFILE"
  minikube start --profile "$PROFILE" \
    --cpus "${PFEDLA_MINIKUBE_CPUS:-4}" --memory "${PFEDLA_MINIKUBE_MEMORY:-8g}" \
    --cni calico \
    ${PFEDLA_MINIKUBE_DRIVER:+--driver "$PFEDLA_MINIKUBE_DRIVER"}
fi

pfedla_install_kfp
pfedla_load_step_image minikube --profile "$PROFILE" image load
pfedla_deploy "$PFEDLA_K8S_DIR/overlays/kind"
pfedla_print_endpoints
