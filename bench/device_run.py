"""One call on the device machine: install the carried wheels, then run a plan of benchmark
batches, lanes of GPUs in parallel, inside one time budget.

  python3 bench/device_run.py bench/plans/h100x2-varlen.json [--no-wheels]

A plan is {"stages": [{"untilS": 420, "lanes": {"0": [BATCH, ...], "1": [...]}}, ...]}.
Each BATCH is one run.py argument string, or "!" and a command line to run as it is. A lane is the GPUs its batches see
(CUDA_VISIBLE_DEVICES): lanes of one stage run side by side, each lane's batches one after
the other, and no case starts after the stage's untilS (seconds from the start). Two
single-GPU lanes on a two-GPU machine measure twice the cases per device minute; each case
still has its GPU to itself.

Each lane writes its own results directory and tars it into $OUT/lane-<gpus>/ after every
case, so a call cut off at its limit still brings back every finished case. merge_results.py
folds the tars into bench/results/.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def install_wheels() -> dict:
    wheels = sorted(glob.glob(str(HERE.parent / ".whl" / "*.whl")))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", "/tmp/site", *wheels], check=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in ("/tmp/site", env.get("PYTHONPATH")) if p)
    return env


def run_lane(gpus: str, batches: list[str], until_s: float, start: float, env: dict) -> None:
    out = Path("/tmp/bench-results") / f"lane-{gpus.replace(',', '')}"
    mirror = Path(os.environ.get("OUT", "/tmp/out")) / f"lane-{gpus.replace(',', '')}"
    lane_env = dict(env, CUDA_VISIBLE_DEVICES=gpus)
    with open(out.parent / f"lane-{gpus.replace(',', '')}.log", "a") as log:
        for batch in batches:
            left = until_s - (time.monotonic() - start)
            if left < 20:
                print(f"[device_run] lane {gpus}: out of time, skipping: {batch}", flush=True)
                continue
            if batch.startswith("!"):  # a check to run first, e.g. the GPU tests; its output goes to the lane log
                command = shlex.split(batch[1:])
            else:
                command = [sys.executable, str(HERE / "run.py"), *shlex.split(batch), "--out", str(out),
                           "--mirror", str(mirror), "--deadline-s", str(int(left)), "--case-timeout-s", "240"]
            subprocess.run(command, env=lane_env, stdout=log, stderr=subprocess.STDOUT, timeout=left + 60)
    print(f"[device_run] lane {gpus} done at {time.monotonic() - start:.0f}s", flush=True)


def main() -> int:
    plan = json.loads(Path(sys.argv[1]).read_text())
    wheels = "--no-wheels" not in sys.argv  # a CPU smoke test here uses the venv as it is
    # A warm machine still holds the last call's results: start clean, so this call's tars
    # and lane logs hold this call's cases only.
    shutil.rmtree("/tmp/bench-results", ignore_errors=True)
    Path("/tmp/bench-results").mkdir(parents=True)
    env = install_wheels() if wheels else dict(os.environ)
    env["BENCH_CALL"] = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())  # every row of this call records it
    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv"])
    start = time.monotonic()
    for stage in plan["stages"]:
        threads = [threading.Thread(target=run_lane, args=(gpus, batches, stage["untilS"], start, env))
                   for gpus, batches in stage["lanes"].items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # The lanes' summaries, last: the reply shows the end of the output.
    for log in sorted(Path("/tmp/bench-results").glob("lane-*.log")):
        lines = log.read_text().splitlines()
        table = [line for line in lines if line.startswith(("llama", "tiny", "case ", "[run]", "FAILED", "PASSED", "ERROR"))
                 or any(word in line for word in (" passed", " failed", " skipped", " error"))]
        print(f"== {log.name}\n" + "\n".join(table[-30:]))
        if os.environ.get("OUT"):
            shutil.copy(log, Path(os.environ["OUT"]) / log.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
