#!/usr/bin/env bash
# Build the local control plane from the upstream Go modules at the versions pinned in
# hack/versions.env, caching each binary by version so a second run is a no-op.
#
#   hack/build-binaries.sh [component...]    components: kubernetes etcd kwok karpenter helm coredns registry
#                                            actionlint
#
# Prints the cache directory holding the binaries. Build logs go to $CACHE/logs/.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

CACHE=${FTO_CACHE:-$HOME/.cache/finetune-operator}
BIN=$CACHE/bin
WORK=$CACHE/build
LOGS=$CACHE/logs
mkdir -p "$BIN" "$WORK" "$LOGS"
export GOFLAGS=-mod=mod CGO_ENABLED=0

log() { echo "build-binaries: $*" >&2; }

# Installs $1 (a path to a built binary) as $BIN/$2-$3 and points $BIN/$2 at it.
install_bin() {
  install -m 0755 "$1" "$BIN/$2-$3.tmp" && mv "$BIN/$2-$3.tmp" "$BIN/$2-$3"
  ln -sfn "$2-$3" "$BIN/$2"
}

have() { [ -x "$BIN/$1-$2" ] && ln -sfn "$1-$2" "$BIN/$1"; }

build_kubernetes() {
  local k=$KUBERNETES_VERSION v minor dir gomod
  local b ok=1
  for b in $K8S_BINARIES; do have "$b" "$k" || ok=0; done
  [ "$ok" = 1 ] && return
  log "building $K8S_BINARIES $k (15-25 min on 2 cores)"
  v=v0.${k#v1.}; minor=$(cut -d. -f2 <<<"$k")
  dir=$WORK/k8s-$k; rm -rf "$dir"; mkdir -p "$dir/out"
  (
    cd "$dir"
    go mod init local/k8sbins
    gomod=$(go mod download -json "k8s.io/kubernetes@$k" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    # k8s.io/kubernetes requires its staging modules at v0.0.0 via ./staging replaces, which
    # a module zip cannot carry; pin each one to its published tag instead.
    for m in $(sed -n 's#^\t\(k8s.io/[^ ]*\) => \./staging/.*#\1#p' "$gomod"); do
      go mod edit -replace="$m=$m@$v"
    done
    go get "k8s.io/kubernetes@$k"
    ld="-s -w -X k8s.io/component-base/version.gitVersion=$k -X k8s.io/component-base/version.gitMajor=1"
    ld+=" -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
    # shellcheck disable=SC2046
    go build -trimpath -ldflags "$ld" -o out/ $(printf 'k8s.io/kubernetes/cmd/%s ' $K8S_BINARIES)
  ) >"$LOGS/kubernetes-$k.log" 2>&1 || { log "kubernetes build failed, see $LOGS/kubernetes-$k.log"; tail -20 "$LOGS/kubernetes-$k.log" >&2; return 1; }
  for b in $K8S_BINARIES; do install_bin "$dir/out/$b" "$b" "$k"; done
  rm -rf "$dir"
}

# The kubelet runs the local cluster's real node (hack/real_node.sh).
# A machine that runs no real node (hack/gpu-e2e.sh) names fewer.
K8S_BINARIES=${K8S_BINARIES:-kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet}

build_etcd() {
  local e=$ETCD_VERSION dir
  have etcd "$e" && return
  log "building etcd $e"
  dir=$WORK/etcd-$e; rm -rf "$dir"; mkdir -p "$dir"
  (
    cd "$dir" && go mod init local/etcdbin && go get "go.etcd.io/etcd/server/v3@$e" \
      && go build -trimpath -ldflags "-s -w" -o etcd go.etcd.io/etcd/server/v3
  ) >"$LOGS/etcd-$e.log" 2>&1 || { log "etcd build failed, see $LOGS/etcd-$e.log"; tail -20 "$LOGS/etcd-$e.log" >&2; return 1; }
  install_bin "$dir/etcd" etcd "$e"; rm -rf "$dir"
}

# go install MODULE/PKG@VERSION into a scratch GOBIN, then cache it under NAME.
go_install() { # name version package
  local name=$1 ver=$2 pkg=$3 dir
  have "$name" "$ver" && return
  log "building $name $ver"
  dir=$WORK/$name-$ver; rm -rf "$dir"; mkdir -p "$dir"
  GOBIN=$dir GOFLAGS= go install -trimpath -ldflags "-s -w" "$pkg@$ver" >"$LOGS/$name-$ver.log" 2>&1 \
    || { log "$name build failed, see $LOGS/$name-$ver.log"; tail -20 "$LOGS/$name-$ver.log" >&2; return 1; }
  install_bin "$dir/$(basename "${pkg%%/v[0-9]*}")" "$name" "$ver" 2>/dev/null || install_bin "$dir"/* "$name" "$ver"
  rm -rf "$dir"
}

build_kwok() { go_install kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok; }
# Karpenter's KWOK provider binary is also called "kwok"; cache it as karpenter-kwok.
build_karpenter() { go_install karpenter-kwok "$KARPENTER_VERSION" sigs.k8s.io/karpenter/kwok; }
build_helm() { go_install helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm; }

# A binary of the repository's own main package (hack/NAME/*.go) on MODULE@VERSION: cached by
# the version and by the digest of that source, so editing the main rebuilds it.
go_own_main() { # name version module
  local name=$1 v=$2 module=$3 src=$here/$1 tag dir
  tag=$v-$(cd "$src" && find . -name '*.go' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-12)
  have "$name" "$tag" && return
  log "building $name ($module $v)"
  dir=$WORK/$name-$tag; rm -rf "$dir"; mkdir -p "$dir"
  cp -r "$src/." "$dir/"
  (
    cd "$dir" && go mod init "local/$name" && go get "$module@$v" && go mod tidy \
      && go build -trimpath -ldflags "-s -w" -o "$name" .
  ) >"$LOGS/$name-$v.log" 2>&1 || { log "$name build failed, see $LOGS/$name-$v.log"; tail -20 "$LOGS/$name-$v.log" >&2; return 1; }
  install_bin "$dir/$name" "$name" "$tag"; rm -rf "$dir"
}

# Cluster DNS: CoreDNS with only the plugins the cluster uses (hack/coredns/main.go), so the
# build stays small (about 3 minutes on 2 cores with a cold cache).
build_coredns() { go_own_main coredns "$COREDNS_VERSION" github.com/coredns/coredns; }
# The OCI registry the push test pushes to: go-containerregistry's in-memory registry
# (hack/registry/main.go: it listens on loopback only).
build_registry() { go_own_main registry "$GGCR_VERSION" github.com/google/go-containerregistry; }
# The release workflow's linter (tests/unit/test_release_workflow.py).
build_actionlint() { go_install actionlint "$ACTIONLINT_VERSION" github.com/rhysd/actionlint/cmd/actionlint; }

components=("$@")
[ ${#components[@]} -gt 0 ] || components=(etcd kwok kubernetes karpenter helm coredns registry actionlint)
for c in "${components[@]}"; do "build_$c"; done
echo "$BIN"
