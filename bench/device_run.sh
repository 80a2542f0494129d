#!/usr/bin/env bash
# One call on the device machine: install the carried wheels, then run benchmark batches in
# priority order under one time budget (seconds, $1), so the call returns inside its limit.
# Each later argument is one batch: the run.py arguments, quoted. Results land in
# bench/results/ and are tarred into $OUT after every case.
set -u
budget=$1; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python3 -c "import torch,transformers,peft,deepspeed;print(torch.__version__,transformers.__version__,peft.__version__,deepspeed.__version__)" 2>&1 | tail -1
t0=$(date +%s)
for batch in "$@"; do
  left=$(( budget - ($(date +%s) - t0) ))
  [ "$left" -gt 20 ] || { echo "[device_run] out of budget, skipping: $batch"; continue; }
  # shellcheck disable=SC2086
  python3 bench/run.py $batch --out bench/results --mirror "${OUT:-}" --deadline-s "$left" --case-timeout-s 200
done
