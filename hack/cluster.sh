#!/usr/bin/env bash
# A real local control plane, no Docker: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler and kwok (fake nodes that run pods through scripted stages), all bound to
# 127.0.0.1 and built from their Go modules by hack/build-binaries.sh; and one real node,
# local-0: the upstream kubelet with containerd and runc, running the product's own images
# (hack/node.sh, hack/images.sh). It is tainted finetune.ai/local-node, so only pods that
# tolerate it run there; every other pod lands on kwok's nodes. Cluster DNS is CoreDNS (built
# from its module with hack/coredns/main.go) on $DNS_IP:53, serving cluster.local from the API
# under its own least-privilege identity; the real node's pods use it (kubelet clusterDNS), and
# process nodes do when started with --cluster-dns $DNS_IP.
#
#   hack/cluster.sh up [--karpenter]
#                           start it (idempotent: a healthy cluster is left as it is); with
#                           --karpenter also Karpenter's KWOK provider, so NodePools become nodes
#   hack/cluster.sh down    stop the processes it started, by pid (containers and their shims
#                           included), unmount what they mounted and remove their state
#   hack/cluster.sh status  say whether it is up
#
# State, logs and pids live in $CLUSTER_DIR (default .cluster/ in the repository); the
# kubeconfig for users and tests is $CLUSTER_DIR/kubeconfig. Every process logs to
# $CLUSTER_DIR/logs/, never to the terminal.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
source "$here/versions.env"
CACHE=${FTO_CACHE:-$HOME/.cache/finetune-operator}

CLUSTER_DIR=${CLUSTER_DIR:-$repo/.cluster}
APISERVER_PORT=${APISERVER_PORT:-6443}
ETCD_CLIENT_PORT=${ETCD_CLIENT_PORT:-2379}
ETCD_PEER_PORT=${ETCD_PEER_PORT:-2380}
KCM_PORT=${KCM_PORT:-10257}
SCHEDULER_PORT=${SCHEDULER_PORT:-10259}
KWOK_METRICS_PORT=${KWOK_METRICS_PORT:-10247}
KARPENTER_METRICS_PORT=${KARPENTER_METRICS_PORT:-18090}
KARPENTER_HEALTH_PORT=${KARPENTER_HEALTH_PORT:-18091}
# Pod IPs handed out by kwok: inside 127.0.0.0/8 so nothing ever points outside loopback.
POD_CIDR=${POD_CIDR:-127.100.0.0/16}
# Service ClusterIPs, on loopback too; the first one is the `kubernetes` Service's.
SERVICE_CIDR=127.96.0.0/16
KUBERNETES_SERVICE_IP=127.96.0.1
# Cluster DNS (CoreDNS): its own loopback address, so port 53 there is free; health and
# readiness endpoints on the same address.
DNS_IP=${DNS_IP:-127.0.0.10}
CLUSTER_DOMAIN=cluster.local

PIDS=$CLUSTER_DIR/pids
LOGS=$CLUSTER_DIR/logs
PKI=$CLUSTER_DIR/pki
KUBECONFIG_FILE=$CLUSTER_DIR/kubeconfig
# all: kwok's nodes, cluster DNS and the real node local-0 too; control-plane: etcd, the API
# server, controller manager and scheduler alone, for a machine that brings its own nodes (the
# GPU machine's process nodes, hack/gpu-e2e.sh); control-plane+dns: those and cluster DNS, for
# nodes whose pods find each other by name (several nodes).
CLUSTER_PARTS=${CLUSTER_PARTS:-all}
case $CLUSTER_PARTS in
  all | control-plane | control-plane+dns) ;;
  *) echo "cluster: CLUSTER_PARTS=$CLUSTER_PARTS: want all, control-plane or control-plane+dns" >&2; exit 2 ;;
esac

say() { echo "cluster: $*" >&2; }

# Running, and not a zombie: a killed process whose parent never reaps it still answers kill -0.
alive() {
  [ -f "$PIDS/$1" ] || return 1
  local state; state=$(ps -o stat= -p "$(cat "$PIDS/$1")" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "${state:0:1}" != Z ]
}

start() { # name command...
  local name=$1; shift
  if alive "$name"; then return; fi
  "$@" >"$LOGS/$name.log" 2>&1 &
  echo $! >"$PIDS/$name"
}

# SIGTERM to the process recorded as NAME, SIGKILL after 5 s; then forget its pid.
stop() { # name
  local pid
  [ -f "$PIDS/$1" ] || return 0
  if alive "$1"; then
    pid=$(cat "$PIDS/$1")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do alive "$1" || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$PIDS/$1"
}

wait_for() { # description seconds command...
  local what=$1 secs=$2; shift 2
  for _ in $(seq $((secs * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  say "timed out waiting for $what; logs in $LOGS"
  return 1
}

kubectl() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

# A kubeconfig for USER, who proves who it is with the client certificate $PKI/USER.crt (signed
# by the cluster CA): the kubelet's and CoreDNS's identities.
cert_kubeconfig() { # user
  cat <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "https://127.0.0.1:$APISERVER_PORT", certificate-authority: "$PKI/ca.crt"}
users:
- name: $1
  user: {client-certificate: "$PKI/$1.crt", client-key: "$PKI/$1.key"}
contexts:
- name: local
  context: {cluster: local, user: $1}
current-context: local
EOF
}

# shellcheck source=node.sh
source "$here/node.sh"

make_pki() {
  [ -f "$PKI/serving.crt" ] && return
  mkdir -p "$PKI"
  (
    cd "$PKI"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=finetune-local-ca" \
      -keyout ca.key -out ca.crt
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout serving.key -out serving.csr
    printf 'subjectAltName=IP:127.0.0.1,IP:%s,DNS:localhost,DNS:kubernetes.default.svc\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' "$KUBERNETES_SERVICE_IP" >ext.cnf
    openssl x509 -req -in serving.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile ext.cnf -out serving.crt
    openssl genrsa -out sa.key 2048
    openssl rsa -in sa.key -pubout -out sa.pub
    # Static bearer tokens: the admin (system:masters) for people and tests.
    echo "$(openssl rand -hex 24),admin,admin,system:masters" >tokens.csv
  ) >"$LOGS/pki.log" 2>&1
  node_pki
}

write_kubeconfig() {
  local token; token=$(cut -d, -f1 "$PKI/tokens.csv")
  # Created owner-only before the token goes in (a umask here would reach every process started after).
  install -m 600 /dev/null "$KUBECONFIG_FILE"
  cat >"$KUBECONFIG_FILE" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: admin
  user:
    token: $token
contexts:
- name: local
  context: {cluster: local, user: admin}
current-context: local
EOF
}

kwok_stages() {
  local dir
  dir=$(module_dir "sigs.k8s.io/kwok@$KWOK_VERSION")
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-delete.yaml; do
    cat "$dir/kustomize/stage/$f"; echo "---"
  done
  cat "$here/kwok/pod-exit.yaml"
}

module_dir() { (cd "$repo" && go mod download -json "$1" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p'); }

karpenter_up() {
  BIN=$("$here/build-binaries.sh" karpenter)
  if alive karpenter; then return; fi
  local dir; dir=$(module_dir "sigs.k8s.io/karpenter@$KARPENTER_VERSION")
  # The chart copies of the NodePool/NodeClaim CRDs allow the karpenter.kwok.sh labels.
  kubectl apply --server-side --force-conflicts -f "$dir/kwok/charts/crds/karpenter.sh_nodepools.yaml" \
    -f "$dir/kwok/charts/crds/karpenter.sh_nodeclaims.yaml" -f "$dir/kwok/charts/crds/karpenter.sh_nodeoverlays.yaml" \
    -f "$dir/kwok/apis/crds/karpenter.kwok.sh_kwoknodeclasses.yaml" >"$LOGS/karpenter-crds.log" 2>&1
  kubectl wait --for=condition=Established --timeout=60s crd/nodepools.karpenter.sh crd/nodeclaims.karpenter.sh \
    crd/kwoknodeclasses.karpenter.kwok.sh >>"$LOGS/karpenter-crds.log" 2>&1
  kubectl apply -f "$here/karpenter/nodeclass.yaml" >>"$LOGS/karpenter-crds.log" 2>&1
  # Karpenter parses os.Args itself and panics on unknown flags: configure it by environment.
  start karpenter env KUBECONFIG="$KUBECONFIG_FILE" DISABLE_LEADER_ELECTION=true \
    INSTANCE_TYPES_FILE_PATH="$here/karpenter/instance-types.json" \
    METRICS_PORT="$KARPENTER_METRICS_PORT" HEALTH_PROBE_PORT="$KARPENTER_HEALTH_PORT" \
    BATCH_IDLE_DURATION=500ms BATCH_MAX_DURATION=2s LOG_LEVEL=debug "$BIN/karpenter-kwok"
  wait_for karpenter 60 curl -sf "http://127.0.0.1:$KARPENTER_HEALTH_PORT/healthz"
  say "karpenter up"
}

# CoreDNS's identity: a client certificate for the user system:coredns, bound to a ClusterRole
# that may only list and watch what the kubernetes plugin reads (as kubeadm's system:coredns).
dns_pki() {
  [ -f "$PKI/coredns.crt" ] && return
  (
    cd "$PKI"
    printf 'extendedKeyUsage=clientAuth\n' >client.cnf
    openssl req -newkey rsa:2048 -nodes -subj "/CN=system:coredns" -keyout coredns.key -out coredns.csr
    openssl x509 -req -in coredns.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile client.cnf -out coredns.crt
  ) >>"$LOGS/pki.log" 2>&1
}

dns_config() {
  cert_kubeconfig coredns >"$CLUSTER_DIR/coredns.kubeconfig"
  # Only the cluster's zones: anything else is refused, never forwarded off the machine.
  cat >"$CLUSTER_DIR/Corefile" <<EOF
$CLUSTER_DOMAIN:53 in-addr.arpa:53 ip6.arpa:53 {
    bind $DNS_IP
    errors
    log
    health $DNS_IP:8080
    ready $DNS_IP:8181
    # The pods of headless Services (<hostname>.<subdomain>.<ns>.svc): from the Pods, since
    # the API refuses EndpointSlices with loopback addresses (hack/coredns/podhosts).
    podhosts $CLUSTER_DOMAIN {
        kubeconfig $CLUSTER_DIR/coredns.kubeconfig local
    }
    kubernetes $CLUSTER_DOMAIN in-addr.arpa ip6.arpa {
        kubeconfig $CLUSTER_DIR/coredns.kubeconfig local
        pods insecure
        ttl 5
    }
    cache 5
}
EOF
}

dns_up() {
  alive coredns && return
  local bin; bin=$("$here/build-binaries.sh" coredns)
  dns_pki
  kubectl apply -f - >"$LOGS/coredns-rbac.log" 2>&1 <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- {apiGroups: [""], resources: [endpoints, services, pods, namespaces], verbs: [list, watch]}
- {apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:coredns"}
EOF
  dns_config
  start coredns "$bin/coredns" -conf "$CLUSTER_DIR/Corefile"
  wait_for "coredns ready at $DNS_IP" 60 curl -sf "http://$DNS_IP:8181/ready"
  say "cluster DNS at $DNS_IP"
}

up() {
  if [ "$CLUSTER_PARTS" != all ]; then
    BIN=$(K8S_BINARIES="kube-apiserver kube-controller-manager kube-scheduler kubectl" "$here/build-binaries.sh" etcd kubernetes)
  else
    BIN=$("$here/build-binaries.sh" etcd kubernetes kwok)
  fi
  mkdir -p "$PIDS" "$LOGS"
  if alive kube-apiserver && kubectl get --raw /readyz >/dev/null 2>&1 && alive kwok && alive kubelet && alive kubernetes-service \
      && alive coredns && ! kubelet_config_changed; then
    say "already running ($KUBECONFIG_FILE)"
    build_images && import_images
    if [ "${1:-}" = "--karpenter" ]; then karpenter_up; fi
    return
  fi
  make_pki
  write_kubeconfig

  start etcd "$BIN/etcd" --name=local --data-dir="$CLUSTER_DIR/etcd" --unsafe-no-fsync --log-level=warn \
    --listen-client-urls="http://127.0.0.1:$ETCD_CLIENT_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="local=http://127.0.0.1:$ETCD_PEER_PORT" --listen-metrics-urls=""
  wait_for etcd 30 curl -sf "http://127.0.0.1:$ETCD_CLIENT_PORT/health"

  start kube-apiserver "$BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$APISERVER_PORT" \
    --tls-cert-file="$PKI/serving.crt" --tls-private-key-file="$PKI/serving.key" --client-ca-file="$PKI/ca.crt" \
    --token-auth-file="$PKI/tokens.csv" --authorization-mode=Node,RBAC \
    --service-account-issuer="https://127.0.0.1:$APISERVER_PORT" --service-account-key-file="$PKI/sa.pub" \
    --service-account-signing-key-file="$PKI/sa.key" --service-cluster-ip-range="$SERVICE_CIDR" \
    --allow-privileged=false --endpoint-reconciler-type=none --enable-priority-and-fairness=false \
    --kubelet-client-certificate="$PKI/apiserver-kubelet.crt" --kubelet-client-key="$PKI/apiserver-kubelet.key" \
    --kubelet-preferred-address-types=InternalIP \
    --profiling=false --v=1
  wait_for kube-apiserver 90 kubectl get --raw /readyz

  local controllers=job-controller,garbage-collector-controller,namespace-controller,ttl-after-finished-controller
  controllers+=,pod-garbage-collector-controller,serviceaccount-controller,serviceaccount-token-controller
  controllers+=,root-ca-certificate-publisher-controller,replicaset-controller,deployment-controller
  controllers+=,node-lifecycle-controller,endpointslice-controller,persistentvolume-binder-controller
  controllers+=,persistentvolumeclaim-protection-controller,persistentvolume-protection-controller
  controllers+=,clusterrole-aggregation-controller  # the chart's user roles join edit/admin/view
  start kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig="$KUBECONFIG_FILE" \
    --leader-elect=false --bind-address=127.0.0.1 --secure-port="$KCM_PORT" --controllers="$controllers" \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" --use-service-account-credentials=false \
    --profiling=false --v=1
  start kube-scheduler "$BIN/kube-scheduler" --kubeconfig="$KUBECONFIG_FILE" --leader-elect=false \
    --bind-address=127.0.0.1 --secure-port="$SCHEDULER_PORT" --profiling=false --v=1

  if [ "$CLUSTER_PARTS" != all ]; then
    wait_for "default service account" 60 kubectl -n default get serviceaccount default
    if [ "$CLUSTER_PARTS" = control-plane+dns ]; then dns_up; fi
    say "up, control plane only: export KUBECONFIG=$KUBECONFIG_FILE"
    return
  fi
  kwok_stages >"$CLUSTER_DIR/kwok-stages.yaml"
  start kwok "$BIN/kwok" --kubeconfig="$KUBECONFIG_FILE" --config="$CLUSTER_DIR/kwok-stages.yaml" \
    --manage-all-nodes=false --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --manage-nodes-with-label-selector= --node-ip=127.0.0.1 --cidr="$POD_CIDR" \
    --node-lease-duration-seconds=40 --server-address="127.0.0.1:$KWOK_METRICS_PORT"

  kubectl apply -f "$here/nodes.yaml" >"$LOGS/nodes.log" 2>&1
  wait_for "nodes Ready" 60 kubectl wait --for=condition=Ready node --all --timeout=1s
  wait_for "default service account" 60 kubectl -n default get serviceaccount default
  dns_up
  node_up
  if [ "${1:-}" = "--karpenter" ]; then karpenter_up; fi
  say "up: export KUBECONFIG=$KUBECONFIG_FILE"
}

down() {
  local name
  node_down
  for name in karpenter coredns kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do stop "$name"; done
  rm -rf --one-file-system "$CLUSTER_DIR"
  say "down"
}

status() {
  BIN=${FTO_CACHE:-$HOME/.cache/finetune-operator}/bin
  if alive kube-apiserver && kubectl get --raw /readyz >/dev/null 2>&1; then
    say "up ($KUBECONFIG_FILE)"
  else
    say "down"; return 1
  fi
}

case ${1:-} in
  up) up "${2:-}" ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
