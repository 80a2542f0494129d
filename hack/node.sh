# The local cluster's real node: the upstream kubelet (built from the pinned k8s.io/kubernetes
# module), containerd and runc from Debian, the product's images imported into containerd.
# Sourced by hack/cluster.sh, which defines CLUSTER_DIR, PKI, LOGS, PIDS, BIN, CACHE and the
# helpers start/stop/alive/wait_for/kubectl/say.
#
# Networking, without ever leaving 127.0.0.0/8:
# - The kubelet serves on 127.0.0.1. It refuses a loopback --node-ip, so it runs as if under an
#   external cloud provider (--cloud-provider=external) and this script plays that provider's
#   one part that matters here: it sets the Node's address to 127.0.0.1 and lifts the
#   "uninitialized" taint. A kubelet under an external provider keeps addresses someone else
#   set, so `kubectl logs/exec` (API server -> kubelet) go to 127.0.0.1.
# - Pods use the host network (the chart's `hostNetwork` values; the trainer's via the
#   operator's FINETUNE_TRAINER_HOST_NETWORK): there is no pod network here, because a CNI
#   bridge would need an address outside loopback. The CNI config is loopback-only, which is
#   what containerd needs to report the network ready.
# - Service ClusterIPs come from 127.96.0.0/16 (the API server's range) and there is no
#   kube-proxy: a Service whose port equals its target port on this one node is reached at its
#   ClusterIP by the kernel's loopback routing, the way kube-proxy would route it to the pod.
#   The one Service whose ports differ is `kubernetes` (443 -> the API server's port), which every
#   in-cluster client finds through KUBERNETES_SERVICE_HOST/PORT: socat forwards it, as
#   kube-proxy would.
# - Cluster DNS is CoreDNS at $DNS_IP (hack/cluster.sh): the kubelet's clusterDNS, so pods with
#   dnsPolicy ClusterFirstWithHostNet (the trainer's, on the host network) resolve Services and
#   the pods of headless Services (<pod>.<subdomain>.<ns>.svc.cluster.local).
#
# Images and snapshots live in the cache (containerd's root), so an image imported once is
# there for every later cluster; containerd's state, sockets and the kubelet's root live in
# $CLUSTER_DIR/node and go with `down`.

NODE_NAME=${NODE_NAME:-local-0}
NODE_LABEL=finetune.ai/local-node
KUBELET_PORT=${KUBELET_PORT:-10350}
KUBELET_HEALTHZ_PORT=${KUBELET_HEALTHZ_PORT:-10348}
NODE_DIR=$CLUSTER_DIR/node
CONTAINERD_ROOT=$CACHE/containerd
CONTAINERD_SOCK=$NODE_DIR/containerd.sock

ctr_() { ctr --address "$CONTAINERD_SOCK" --namespace k8s.io "$@"; }

node_packages() {
  local missing=()
  command -v containerd >/dev/null || missing+=(containerd)
  command -v runc >/dev/null || missing+=(runc)
  command -v socat >/dev/null || missing+=(socat)
  [ -x /usr/lib/cni/loopback ] || missing+=(containernetworking-plugins)
  [ ${#missing[@]} -eq 0 ] && return
  say "installing ${missing[*]} (Debian packages)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } \
    >"$LOGS/node-packages.log" 2>&1 || { say "apt-get install failed, see $LOGS/node-packages.log"; return 1; }
}

# Client certificates signed by the cluster CA: the kubelet's (a Node identity, for the Node
# authorizer) and the API server's (to call the kubelet: logs, exec; authorized by webhook).
node_pki() {
  [ -f "$PKI/kubelet.crt" ] && return
  (
    cd "$PKI"
    printf 'extendedKeyUsage=clientAuth\n' >client.cnf
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:nodes/CN=system:node:$NODE_NAME" -keyout kubelet.key -out kubelet.csr
    openssl x509 -req -in kubelet.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile client.cnf -out kubelet.crt
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=kube-apiserver-kubelet-client" \
      -keyout apiserver-kubelet.key -out apiserver-kubelet.csr
    openssl x509 -req -in apiserver-kubelet.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile client.cnf -out apiserver-kubelet.crt
  ) >>"$LOGS/pki.log" 2>&1
}

containerd_config() {
  mkdir -p "$NODE_DIR/cni" "$CONTAINERD_ROOT"
  cat >"$NODE_DIR/cni/10-loopback.conflist" <<'EOF'
{"cniVersion": "1.0.0", "name": "loopback", "plugins": [{"type": "loopback"}]}
EOF
  cat >"$NODE_DIR/containerd.toml" <<EOF
version = 2
root = "$CONTAINERD_ROOT"
state = "$NODE_DIR/containerd-state"
[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$CONTAINERD_SOCK.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_tls_streaming = false
  # This machine lacks CAP_SYS_RESOURCE: never ask for a lower OOM score than containerd's own.
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE_DIR/cni"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$NODE_DIR/registries"
EOF
  # No registry is reachable from here and none may be tried: an image missing from containerd
  # whose pod allows pulls goes to a closed loopback port (ErrImagePull), not to Docker Hub.
  mkdir -p "$NODE_DIR/registries/docker.io"
  cat >"$NODE_DIR/registries/docker.io/hosts.toml" <<'EOF'
server = "http://127.0.0.1:9"
[host."http://127.0.0.1:9"]
  capabilities = ["pull", "resolve"]
EOF
}

kubelet_config() {
  cert_kubeconfig kubelet >"$NODE_DIR/kubelet.kubeconfig"
  kubelet_yaml >"$NODE_DIR/kubelet.yaml"
}

# A running kubelet started from another configuration (e.g. before cluster DNS existed).
kubelet_config_changed() {
  [ -f "$NODE_DIR/kubelet.yaml" ] || return 1
  ! cmp -s <(kubelet_yaml) "$NODE_DIR/kubelet.yaml"
}

kubelet_yaml() {
  cat <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$PKI/ca.crt"}
authorization: {mode: Webhook}
containerRuntimeEndpoint: "unix://$CONTAINERD_SOCK"
cgroupDriver: cgroupfs
# This machine mounts cgroup v1 hierarchies; 1.35 supports them only when asked to.
failCgroupV1: false
failSwapOn: false
# Images are imported, never pulled, and must never be collected.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# Never evict test pods: the thresholds are far below anything a run reaches.
evictionHard: {memory.available: "50Mi", nodefs.available: "1%", nodefs.inodesFree: "1%", imagefs.available: "1%"}
evictionPressureTransitionPeriod: 10s
registerWithTaints:
- {key: $NODE_LABEL, value: "true", effect: NoSchedule}
maxPods: 20
nodeStatusUpdateFrequency: 10s
shutdownGracePeriod: 0s
resolvConf: /etc/resolv.conf
clusterDNS: [$DNS_IP]
clusterDomain: $CLUSTER_DOMAIN
EOF
}

containerd_up() {
  alive containerd && return
  node_packages
  containerd_config
  start containerd containerd --config "$NODE_DIR/containerd.toml" --log-level info
  wait_for containerd 60 ctr_ version
}

# Import an OCI archive into containerd unless the same image (by manifest digest) is there.
import_image() { # archive name
  local archive=$1 name=$2 want have
  want=$(tar -xOf "$archive" index.json | python3 -c 'import json,sys; print(json.load(sys.stdin)["manifests"][0]["digest"])')
  have=$(ctr_ images ls "name==$name" 2>/dev/null | awk 'NR==2 {print $3}')
  [ "$want" = "$have" ] && return
  say "importing $name into containerd"
  # --base-name keeps the archive's own reference (buildah writes it as the OCI ref name).
  ctr_ images import --snapshotter overlayfs --base-name "${name%:*}" "$archive" >>"$LOGS/images-import.log" 2>&1
  have=$(ctr_ images ls "name==$name" 2>/dev/null | awk 'NR==2 {print $3}')
  [ "$want" = "$have" ] || { say "importing $archive did not give $name@$want; see $LOGS/images-import.log"; return 1; }
}

# kube-proxy's part for the `kubernetes` Service. socat forks a child per connection, so it
# leads its own process group and `down` stops the group by that pid.
kubernetes_service_up() {
  alive kubernetes-service && return
  local ip port
  ip=$(kubectl get service kubernetes -o jsonpath='{.spec.clusterIP}')
  port=$(kubectl get service kubernetes -o jsonpath='{.spec.ports[0].port}')
  start kubernetes-service setsid socat "TCP-LISTEN:$port,bind=$ip,reuseaddr,fork" "TCP:127.0.0.1:$APISERVER_PORT"
  wait_for "the kubernetes Service at $ip:$port" 30 curl -sk --cacert "$PKI/ca.crt" "https://$ip:$port/readyz"
}

# The images of the current tree: built if needed (a no-op when the inputs are unchanged).
build_images() {
  "$here/images.sh" >>"$LOGS/images.log"
  # shellcheck source=/dev/null
  source "$CACHE/images/current.env"
}

# ...and imported where containerd lacks them; also into a cluster that is already up, so it
# never runs images older than the tree.
import_images() {
  import_image "$PAUSE_IMAGE_ARCHIVE" "$PAUSE_IMAGE"
  import_image "$OPERATOR_IMAGE_ARCHIVE" "$OPERATOR_IMAGE"
  import_image "$TRAINER_IMAGE_ARCHIVE" "$TRAINER_IMAGE"
}

node_up() {
  mkdir -p "$NODE_DIR"
  node_pki
  build_images       # before containerd: its config names the pause image
  containerd_up
  import_images
  kubernetes_service_up
  if alive kubelet && kubelet_config_changed; then
    say "kubelet configuration changed: restarting the kubelet (its containers keep running)"
    stop kubelet
  fi
  if ! alive kubelet; then
    kubelet_config
    start kubelet "$BIN/kubelet" --config="$NODE_DIR/kubelet.yaml" --kubeconfig="$NODE_DIR/kubelet.kubeconfig" \
      --hostname-override="$NODE_NAME" --cloud-provider=external --root-dir="$NODE_DIR/kubelet" \
      --cert-dir="$NODE_DIR/kubelet-pki" --node-labels="$NODE_LABEL=true" --v=1
  fi
  wait_for "node $NODE_NAME to register" 120 kubectl get node "$NODE_NAME"
  # The external provider's part: the address, then the taint it would lift.
  kubectl patch node "$NODE_NAME" --subresource=status --type=merge \
    -p '{"status":{"addresses":[{"type":"InternalIP","address":"127.0.0.1"},{"type":"Hostname","address":"'"$NODE_NAME"'"}]}}' \
    >>"$LOGS/nodes.log" 2>&1
  kubectl taint node "$NODE_NAME" node.cloudprovider.kubernetes.io/uninitialized- >>"$LOGS/nodes.log" 2>&1 || true
  wait_for "node $NODE_NAME Ready" 120 kubectl wait --for=condition=Ready "node/$NODE_NAME" --timeout=1s
}

# Stop every container (SIGKILL: the control plane is going), then containerd, then the
# shims by the pids they recorded, then unmount what is left under the node's directories.
node_down() {
  local pid f
  if alive kubelet; then kill "$(cat "$PIDS/kubelet")" 2>/dev/null || true; fi
  if alive containerd; then
    for id in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
    sleep 1
    for id in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$id" >/dev/null 2>&1 || true; done
    for id in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$id" >/dev/null 2>&1 || true; done
  fi
  for f in "$NODE_DIR"/containerd-state/io.containerd.runtime.v2.task/*/*/shim.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f"); kill -9 "$pid" 2>/dev/null || true
  done
  if alive kubernetes-service; then kill -- "-$(cat "$PIDS/kubernetes-service")" 2>/dev/null || true; fi
  rm -f "$PIDS/kubernetes-service"
  stop kubelet
  stop containerd
  unmount_under "$NODE_DIR" "$CONTAINERD_ROOT"
  remove_pod_cgroups
}

unmount_under() { # dir...
  local dir mnt
  for dir in "$@"; do
    [ -d "$dir" ] || continue
    dir=$(realpath "$dir")
    # Deepest first; mountinfo's 5th field is the mount point (spaces octal-escaped).
    awk -v d="$dir/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r mnt; do
      umount "$(printf '%b' "$mnt")" 2>/dev/null || umount -l "$(printf '%b' "$mnt")" 2>/dev/null || true
    done
  done
}

# The kubelet's cgroups (cgroup v1, cgroupfs driver), once no process is left in them.
remove_pod_cgroups() {
  local c
  for c in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/*/kubepods.slice; do
    [ -d "$c" ] || continue
    find "$c" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
}
