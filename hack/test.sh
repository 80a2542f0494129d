#!/usr/bin/env bash
# Run the test suite against the local control plane.
#
# Reuses a running cluster (make cluster); otherwise starts one for this run and stops it on
# exit, by pid. Services log to .cluster/logs/, never to this terminal. pytest's exit code 5
# ("no tests collected") is a failure: a run that tested nothing must never look green.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

if hack/cluster.sh status 2>/dev/null; then
  hack/cluster.sh up --karpenter   # a running cluster gets Karpenter added if it lacks it
else
  trap 'hack/cluster.sh down' EXIT
  hack/cluster.sh up --karpenter
fi
export KUBECONFIG="$PWD/.cluster/kubeconfig"

set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; failing" >&2
  exit 1
fi
exit "$rc"
