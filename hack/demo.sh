#!/usr/bin/env bash
# `make demo`: the quickstart FineTuneJob end to end on a local control plane, for real.
#
#   1. installs what it needs: the venv (the Makefile's `venv` target, run before this script)
#      and etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok, kubectl and helm
#      built from their Go modules (hack/build-binaries.sh; cached by version);
#   2. starts the local control plane (hack/cluster.sh up, state in .cluster/);
#   3. the cluster's one real node, local-0: the upstream kubelet with containerd and runc,
#      running the product's images (`make images` builds them with buildah; the cluster script
#      imports them); tainted, so only pods that tolerate it land there;
#   4. installs the operator with the Helm chart; its pod runs from the operator image on
#      local-0 and talks to the API server in-cluster, as its least-privilege ServiceAccount;
#   5. creates PersistentVolumes/Claims `data` (holding examples/data/quickstart.jsonl) and
#      `models` on local directories under .demo/, applies examples/quickstart.yaml and follows
#      it with `kubectl finetune watch`;
#   6. checks the published Model: Ready, its digest equal to the adapter file's on disk.
#
# The operator watches only the `default` namespace (a Role there, nothing cluster-wide), so a
# demo left running never competes with the operators the tests start in their own namespaces.
# Everything it starts logs under .cluster/logs/ and keeps running afterwards, so you can look
# around; `make cluster-down` stops it all, the node's containers included.
# The trained adapter stays in .demo/models/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
CLUSTER_DIR=${CLUSTER_DIR:-$repo/.cluster}
DEMO_DIR=${DEMO_DIR:-$repo/.demo}
NAMESPACE=default
RELEASE=finetune-operator
OPERATOR_NAMESPACE=finetune-system
export PATH="$repo/.venv/bin:$PATH"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
fail() { printf 'demo: %s\n' "$*" >&2; exit 1; }
trap 'rc=$?; if [ $rc -ne 0 ]; then echo "demo failed (exit $rc); logs: $CLUSTER_DIR/logs/; stop everything: make cluster-down" >&2; fi' EXIT

[ -x .venv/bin/finetune-operator ] || fail "no .venv: run \`make demo\` (it installs the venv first)"

say "Installing control-plane binaries and helm (cached after the first build)"
BIN=$(hack/build-binaries.sh etcd kwok kubernetes helm)
export PATH="$BIN:$PATH"
start=$SECONDS

say "Starting the local control plane (.cluster/) and its node local-0, with the images (built once per input digest)"
hack/cluster.sh up 2>&1 | sed 's/^/    /'
export KUBECONFIG=$CLUSTER_DIR/kubeconfig
LOGS=$CLUSTER_DIR/logs
PIDS=$CLUSTER_DIR/pids
mkdir -p "$LOGS" "$PIDS"

say "Preparing volumes in .demo/ (data: the quickstart dataset; models: the output)"
mkdir -p "$DEMO_DIR/data" "$DEMO_DIR/models"
# The trainer runs as uid 1000 (build_job's securityContext) and hostPath volumes keep their
# owners: the output claim must be its. The job's destination is mounted by subPath, which the
# kubelet creates as root with this directory's mode: setgid and group-writable, so the new
# directory is the trainer's group's to write (docs/outputs.md).
chown 1000:1000 "$DEMO_DIR/models"
chmod 2775 "$DEMO_DIR/models"
cp examples/data/quickstart.jsonl "$DEMO_DIR/data/"
# A fresh run: the previous quickstart job, its Model and its output go first.
kubectl -n "$NAMESPACE" delete finetunejob quickstart --ignore-not-found --wait=true >>"$LOGS/demo.log" 2>&1 || true
kubectl -n "$NAMESPACE" delete model quickstart --ignore-not-found --wait=true >>"$LOGS/demo.log" 2>&1 || true
rm -rf "$DEMO_DIR/models/quickstart"

say "Installing the operator with Helm (charts/finetune-operator) into $OPERATOR_NAMESPACE"
helm upgrade --install "$RELEASE" charts/finetune-operator --namespace "$OPERATOR_NAMESPACE" --create-namespace \
  --values charts/finetune-operator/ci/local-node-values.yaml --set "watchNamespaces={$NAMESPACE}" \
  --wait --timeout 180s >>"$LOGS/helm.log" 2>&1 \
  || fail "helm install failed; see $LOGS/helm.log"
pod=$(kubectl -n "$OPERATOR_NAMESPACE" get pods -l app.kubernetes.io/instance="$RELEASE" \
  --field-selector=status.phase=Running -o jsonpath='{.items[0].metadata.name}')
node=$(kubectl -n "$OPERATOR_NAMESPACE" get pod "$pod" -o jsonpath='{.spec.nodeName}')
echo "    operator pod $pod is Running on node $node" \
  "($(kubectl get node "$node" -o jsonpath='{.status.nodeInfo.containerRuntimeVersion}'))" \
  "as ServiceAccount $(kubectl -n "$OPERATOR_NAMESPACE" get pod "$pod" -o jsonpath='{.spec.serviceAccountName}')"
echo "    image $(kubectl -n "$OPERATOR_NAMESPACE" get pod "$pod" -o jsonpath='{.status.containerStatuses[0].image} ({.status.containerStatuses[0].imageID})')"

say "Claims data and models, bound to hostPath PersistentVolumes in .demo/"
for claim in data models; do
  kubectl apply -f - >>"$LOGS/demo.log" 2>&1 <<EOF
apiVersion: v1
kind: PersistentVolume
metadata: {name: demo-$claim}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  hostPath: {path: $DEMO_DIR/$claim}
  claimRef: {namespace: $NAMESPACE, name: $claim}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $claim, namespace: $NAMESPACE}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: ""
  volumeName: demo-$claim
  resources: {requests: {storage: 1Gi}}
EOF
done
kubectl -n "$NAMESPACE" wait --for=jsonpath='{.status.phase}'=Bound pvc/data pvc/models --timeout=60s >/dev/null

say "kubectl apply -f examples/quickstart.yaml"
kubectl -n "$NAMESPACE" apply -f examples/quickstart.yaml | sed 's/^/    /'

say "kubectl finetune watch quickstart"
kubectl-finetune watch quickstart -n "$NAMESPACE" --interval 2 || fail "the job did not succeed: kubectl finetune status quickstart"
trainer=$(kubectl -n "$NAMESPACE" get pods -l finetune.ai/job=quickstart -o jsonpath='{.items[0].metadata.name}' 2>/dev/null || true)
if [ -n "$trainer" ]; then
  echo "    trainer pod $trainer ran on node $(kubectl -n "$NAMESPACE" get pod "$trainer" -o jsonpath='{.spec.nodeName}')" \
    "from $(kubectl -n "$NAMESPACE" get pod "$trainer" -o jsonpath='{.status.containerStatuses[0].image} ({.status.containerStatuses[0].imageID})')"
fi

say "The published Model"
kubectl -n "$NAMESPACE" wait --for=jsonpath='{.status.phase}'=Ready model/quickstart --timeout=60s >/dev/null
kubectl -n "$NAMESPACE" get model quickstart | sed 's/^/    /'
out=$DEMO_DIR/models/quickstart
want=$(kubectl -n "$NAMESPACE" get model quickstart -o jsonpath='{.spec.adapter.sha256}')
uri=$(kubectl -n "$NAMESPACE" get model quickstart -o jsonpath='{.spec.adapter.uri}')
have=$(sha256sum "$out/adapter_model.safetensors" | cut -d' ' -f1)
[ "$want" = "$have" ] || fail "Model digest $want != adapter_model.safetensors on disk $have"
python - "$out/result.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))["metrics"]
print(f"    eval loss {m['evalLoss']:.4f} (initial {m['initialEvalLoss']:.4f}), train loss {m['trainLoss']:.4f}, "
      f"{m['steps']} steps, {m['tokens']} tokens")
if not m["evalLoss"] < m["initialEvalLoss"]:
    sys.exit("demo: eval loss did not improve")
EOF
echo "    Model quickstart: $uri, sha256 $want"
echo "    = sha256 of $out/adapter_model.safetensors"
echo "    adapter files: $(cd "$out" && ls | tr '\n' ' ')"

elapsed=$((SECONDS - start))
say "Done in $((elapsed / 60))m$(printf %02d $((elapsed % 60)))s (after installs)"
cat <<EOF
    The cluster, its node local-0 and the operator keep running:
      export KUBECONFIG=$KUBECONFIG PATH=$BIN:$repo/.venv/bin:\$PATH
      kubectl finetune list; kubectl finetune logs quickstart; kubectl get ftj,models
    Logs: $LOGS/   Stop everything: make cluster-down   (the adapter stays in $out)
EOF
