"""Benchmark orchestrator: runs each case in its own process (bench/worker.py), in order, in
one call on the device machine, and appends one row per finished case to summary.json.

  python bench/run.py --models llama-1b,llama-8b --methods lora --data fixed,variable \
      --systems ours,hf-baseline --out bench/results/ [--ceiling] [--variants default,mb2-nogc]

Per case: bench/results/raw/<runId>_<case>.log (the worker's whole output, profile table
included), and for a profiled case <runId>_<case>.trace.json.gz (trace_gaps.compact).
summary.json: a list of rows {device, model, method, zeroStage, gpus, seqLen, data, system,
tokensPerSecPerGpu, peakMemGiB, mfuMethodAware, mfu6N, ...extras}. ceilings.json: the bf16
matmul ceiling of each device it ran on.

--deadline-s stops starting cases that could not finish in time, so a call on the device
machine always returns its results; --mirror DIR tars the results into DIR after each case
(the device tool brings back what is under $OUT even when a command is cut off).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import Case  # noqa: E402


def append_json_list(path: Path, item: dict) -> None:
    items = json.loads(path.read_text()) if path.exists() else []
    items.append(item)
    path.write_text(json.dumps(items, indent=1) + "\n")


def mirror(out: Path, mirror_dir: str | None) -> None:
    if not mirror_dir:
        return
    Path(mirror_dir).mkdir(parents=True, exist_ok=True)
    with tarfile.open(Path(mirror_dir) / "results.tar.gz", "w:gz") as tar:
        tar.add(out, arcname="results")


def build_cases(args) -> list[Case]:
    cases = []
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    for model, seq_len, method, data, system, gpus in itertools.product(
        split(args.models), [int(x) for x in split(args.seq_lens)], split(args.methods), split(args.data),
        split(args.systems), [int(x) for x in split(args.gpus)],
    ):
        if system != "ours" and gpus > 1:
            continue  # the baseline is the single-GPU reference
        variants = split(args.variants) if system == "ours" else ["default"]
        for variant in variants:
            case = Case(model=model, method=method, data=data, system=system, seq_len=seq_len, variant=variant,
                        gpus=gpus, warmup=args.warmup, measure=args.measure, lora_r=args.lora_r)
            case.profile = any(p and p in case.name for p in split(args.profile))
            cases.append(case)
    return cases


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama-8b")
    p.add_argument("--methods", default="lora")
    p.add_argument("--data", default="fixed,variable")
    p.add_argument("--systems", default="ours,hf-baseline")
    p.add_argument("--seq-lens", default="2048")
    p.add_argument("--variants", default="default", help="ours only; see common.parse_variant")
    p.add_argument("--gpus", default="1", help="comma-separated process counts (ours only), e.g. 1,2")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--measure", type=int, default=8)
    p.add_argument("--profile", default="", help="comma-separated substrings of case names to profile")
    p.add_argument("--ceiling", action="store_true", help="also measure the bf16 matmul ceiling")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--mirror", default=os.environ.get("OUT"))
    p.add_argument("--deadline-s", type=float, default=540, help="start no case after this many seconds")
    p.add_argument("--case-timeout-s", type=float, default=240)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()

    start = time.monotonic()
    out = Path(args.out)
    raw_dir = out / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    cases = build_cases(args)
    if args.dry_run:
        for c in cases:
            print(c.name, "(profiled)" if c.profile else "")
        return 0
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    status = []

    def run_worker(name: str, extra_args: list[str], timeout: float, gpus: int = 1) -> dict | None:
        log_path = raw_dir / f"{run_id}_{name}.log"
        result_path = raw_dir / f".{name}.result.json"
        result_path.unlink(missing_ok=True)
        t0 = time.monotonic()
        with open(log_path, "w") as log:
            try:
                launcher = [sys.executable]
                if gpus > 1:
                    launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]
                rc = subprocess.run([*launcher, str(HERE / "worker.py"), "--result", str(result_path), *extra_args],
                                    stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        took = time.monotonic() - t0
        result = json.loads(result_path.read_text()) if rc == 0 and result_path.exists() else None
        result_path.unlink(missing_ok=True)
        status.append((name, rc, round(took, 1), result))
        print(f"[run] {name}: rc={rc} {took:.1f}s", flush=True)
        if result is None:
            print("".join(open(log_path).readlines()[-15:]), flush=True)
        return result

    if args.ceiling:
        result = run_worker("matmul-ceiling", ["--ceiling"], 120)
        if result:
            append_json_list(out / "ceilings.json", {**result, "time": run_id})
        mirror(out, args.mirror)

    for case in cases:
        elapsed = time.monotonic() - start
        if elapsed > args.deadline_s:
            print(f"[run] {case.name}: skipped, deadline ({elapsed:.0f}s elapsed)", flush=True)
            status.append((case.name, "skipped", 0, None))
            continue
        timeout = min(args.case_timeout_s, max(30.0, args.deadline_s + 50 - elapsed))
        trace = ["--trace", str(raw_dir / f"{run_id}_{case.name}.trace.json.gz")] if case.profile else []
        row = run_worker(case.name, ["--case", case.to_json(), *trace], timeout, case.gpus)
        if row:
            row["runId"] = run_id
            append_json_list(out / "summary.json", row)
        mirror(out, args.mirror)

    print("\n%-55s %8s %7s %10s %8s %7s %7s" % ("case", "rc", "secs", "tok/s/GPU", "peakGiB", "MFU-m", "MFU-6N"))
    for name, rc, took, r in status:
        if r and "tokensPerSecPerGpu" in r:
            print("%-55s %8s %7s %10.0f %8.1f %7.3f %7.3f" % (name, rc, took, r["tokensPerSecPerGpu"], r["peakMemGiB"],
                                                             r["mfuMethodAware"], r["mfu6N"]))
        elif r:
            print("%-55s %8s %7s %s" % (name, rc, took, r.get("tflopsMedianRuns")))
        else:
            print("%-55s %8s %7s" % (name, rc, took))
    return 0


if __name__ == "__main__":
    sys.exit(main())
