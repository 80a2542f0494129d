#!/usr/bin/env bash
# A FineTuneJob driven by the operator on the device machine's GPU, recorded (issue 15).
#
# The device machine has a GPU, PyTorch and no container runtime, and reaches no network, so
# what it lacks travels with the call (its limit is 64 MiB, so the binaries travel compressed,
# over one or two calls: each call's `stage` step adds what it carried to the cache):
#   .gpu-e2e/*.xz   kube-apiserver, kube-controller-manager, kube-scheduler, etcd, kubectl, and
#                   CoreDNS for jobs of several nodes (hack/gpu_e2e.py --nodes N)
#                   (hack/gpu-e2e.sh pack writes them here, from the local cache)
#   .whl/*.whl      the Python packages the machine's image lacks (bench/README.md lists them)
#
#   hack/gpu-e2e.sh pack       here: compress the binaries into .gpu-e2e/
#   hack/gpu-e2e.sh stage      there: unpack what this call carried into the cache
#   hack/gpu-e2e.sh run [ARGS] there: stage, install the wheels and this checkout, start the
#                              control plane, measure the bench's case in the same call, then
#                              hack/gpu_e2e.py ARGS: the record goes to $OUT/<runId>.json
#
# Commit the records as bench/results/e2e/<runId>.json.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
source "$here/versions.env"
CACHE=${FTO_CACHE:-$HOME/.cache/finetune-operator}
PACK=$repo/.gpu-e2e
WORK=${GPU_E2E_WORK:-/var/tmp/finetune-gpu-e2e}
# Outside the job's /tmp emptyDir, which would hide it inside the trainer's sandbox.
SITE=${GPU_E2E_SITE:-/opt/finetune-site}
BINARIES="kube-apiserver-$KUBERNETES_VERSION kube-controller-manager-$KUBERNETES_VERSION kube-scheduler-$KUBERNETES_VERSION kubectl-$KUBERNETES_VERSION etcd-$ETCD_VERSION"
# Cluster DNS, for several nodes (--nodes N): carried when packed, used when staged.
COREDNS=$(readlink "$CACHE/bin/coredns" 2>/dev/null || true)

say() { echo "gpu-e2e: $*" >&2; }

pack() {
  mkdir -p "$PACK"
  for b in $BINARIES $COREDNS; do
    [ -f "$PACK/$b.xz" ] || xz -9 -T0 -c "$CACHE/bin/$b" >"$PACK/$b.xz"
  done
  du -ch "$PACK"/*.xz | tail -1
}

stage() {
  mkdir -p "$CACHE/bin"
  local f b
  for f in "$PACK"/*.xz; do
    [ -f "$f" ] || continue
    b=$(basename "$f" .xz)
    [ -x "$CACHE/bin/$b" ] || { xz -dc "$f" >"$CACHE/bin/$b.tmp" && chmod 0755 "$CACHE/bin/$b.tmp" && mv "$CACHE/bin/$b.tmp" "$CACHE/bin/$b"; }
    ln -sfn "$b" "$CACHE/bin/${b%-v*}"
  done
  ls "$CACHE/bin"
}

install_python() {
  # --no-deps: the image holds torch and the rest; the wheels name every package it lacks.
  # A later call on the same machine may carry none: what an earlier one installed stays.
  if compgen -G "$repo/.whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$repo"/.whl/*.whl
  fi
  # This checkout, for its console scripts (finetune-trainer, which the trainer pods run).
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" "$repo"
  export PYTHONPATH=$SITE PATH=$SITE/bin:$PATH
}

run() {
  stage >/dev/null
  for b in $BINARIES; do [ -x "$CACHE/bin/$b" ] || { say "missing $b: carry .gpu-e2e/$b.xz (hack/gpu-e2e.sh pack)"; exit 1; }; done
  install_python
  local out=${OUT:-$WORK/out} cluster=$WORK/cluster rc=0
  mkdir -p "$WORK" "$out"
  export CLUSTER_DIR=$cluster CLUSTER_PARTS=control-plane
  # With CoreDNS staged, the cluster has DNS too, so the pods of several nodes find each other.
  if [ -x "$CACHE/bin/coredns" ]; then CLUSTER_PARTS=control-plane+dns; fi
  trap '"$here/cluster.sh" down >/dev/null 2>&1 || true' EXIT
  "$here/cluster.sh" up
  if [ "${GPU_E2E_BENCH:-1}" = 1 ]; then
    say "the bench's case in the same call: ours, llama-8b LoRA, fixed 2048-token rows"
    python3 "$repo/bench/run.py" --models llama-8b --methods lora --data fixed --systems ours --variants default \
      --gpus 1 --out "$WORK/bench" --mirror "" --deadline-s 240 >"$WORK/bench.log" 2>&1 || rc=$?
    [ "$rc" = 0 ] || { say "bench failed ($rc); see $WORK/bench.log"; tail -30 "$WORK/bench.log" >&2; }
    cp "$WORK/bench/summary.json" "$out/bench-summary.json" 2>/dev/null || true
    tar -C "$WORK" -czf "$out/bench-raw.tgz" bench/raw bench.log 2>/dev/null || true
  fi
  python3 "$here/gpu_e2e.py" --kubeconfig "$cluster/kubeconfig" --kubectl "$CACHE/bin/kubectl" --work "$WORK/run" \
    --out "$out" --bench-summary "$WORK/bench/summary.json" "$@" || rc=$?
  (cd "$WORK/run" && tar -czf "$out/logs.tgz" operator.log gpu-*.log gpu-*/logs) 2>/dev/null || true
  return "$rc"
}

case ${1:-} in
  pack) pack ;;
  stage) stage ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 pack|stage|run [gpu_e2e.py args]" >&2; exit 2 ;;
esac
