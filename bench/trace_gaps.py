"""Where the GPU waits: idle gaps between kernels in a torch.profiler trace, and what the host
was doing during each.

The profile's busy fraction says how much of a step the GPU spends idle; this says why. The
harness marks the trainer's stages on the host with record_function (collate, engine
forward/backward/step, reading step totals); a gap is charged to the innermost stage running
on the host at its midpoint, and synchronizing CUDA calls that overlap a gap are listed.

  python bench/trace_gaps.py bench/results/raw/<run>_<case>.trace.json.gz   # print the summary

compact() keeps what the analysis needs from a chrome trace (kernels, copies, the marked
stages, synchronizing calls), small enough to keep beside the raw logs.
"""

from __future__ import annotations

import bisect
import gzip
import json
import sys
from collections import defaultdict

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
SYNC_CALLS = ("Synchronize", "cudaMemcpy", "cudaStreamWaitEvent", "cudaHostAlloc")
MIN_GAP_US = 5.0


def compact(trace: dict) -> dict:
    """{gpu: [[ts, dur, name]], regions: [[ts, dur, name]], syncs: [[ts, dur, name]]}, µs."""
    gpu, regions, syncs = [], [], []
    for event in trace.get("traceEvents", []):
        if event.get("ph") != "X":
            continue
        category, name = event.get("cat", ""), event.get("name", "")
        ts, dur = float(event.get("ts", 0)), float(event.get("dur", 0))
        if category in GPU_CATEGORIES:
            gpu.append([ts, dur, name[:90]])
        elif category == "user_annotation":
            regions.append([ts, dur, name])
        elif category == "cuda_runtime" and dur >= 20 and any(s in name for s in SYNC_CALLS):
            syncs.append([ts, dur, name])
    for events in (gpu, regions, syncs):
        events.sort()
    return {"gpu": gpu, "regions": regions, "syncs": syncs}


def kernel_kind(name: str) -> str:
    name = name.lower()
    # attention first: the memory-efficient kernels are named fmha_cutlass*
    if any(s in name for s in ("flash", "attention", "fmha", "sdpa")):
        return "attention"
    if any(s in name for s in ("gemm", "cutlass", "xmma", "nvjet", "cublas")):
        return "gemm"
    if any(s in name for s in ("softmax", "cross_entropy", "nll_loss")):
        return "cross_entropy/softmax"
    return "elementwise/other"


def kernel_summary(small: dict, wall_s: float) -> dict:
    """GPU seconds by kind of kernel, the busy share of the wall time (time with at least one
    kernel running, so overlapping streams count once) and the number of launches."""
    by_kind = {"gemm": 0.0, "attention": 0.0, "cross_entropy/softmax": 0.0, "elementwise/other": 0.0}
    for _, dur, name in small["gpu"]:
        by_kind[kernel_kind(name)] += dur
    busy_us = sum(end - start for start, end in _busy_intervals(small["gpu"]))
    return {
        "gpuKernelSeconds": round(sum(by_kind.values()) / 1e6, 4),
        "gpuBusyFraction": round(busy_us / 1e6 / wall_s, 3) if wall_s else None,
        "gpuSecondsByKind": {k: round(v / 1e6, 4) for k, v in by_kind.items()},
        "kernelLaunches": len(small["gpu"]),
    }


def _busy_intervals(gpu: list) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for ts, dur, _ in gpu:
        end = ts + dur
        if merged and ts <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([ts, end])
    return [(a, b) for a, b in merged]


def _innermost(regions: list, at: float) -> str:
    best = None
    for ts, dur, name in regions:
        if ts > at:
            break
        if ts + dur >= at and (best is None or dur < best[1]):
            best = (ts, dur, name)
    return best[2] if best else "(no marked stage)"


def idle_summary(small: dict, top: int = 8) -> dict:
    gpu, regions, syncs = small["gpu"], small["regions"], small["syncs"]
    if not gpu:
        return {"error": "no GPU events in the trace"}
    busy = _busy_intervals(gpu)
    window = busy[-1][1] - busy[0][0]
    by_stage: dict[str, float] = defaultdict(float)
    gaps = []
    sync_starts = [s[0] for s in syncs]
    for (_, end), (start, _) in zip(busy, busy[1:]):
        length = start - end
        if length < MIN_GAP_US:
            continue
        stage = _innermost(regions, (start + end) / 2)
        by_stage[stage] += length
        # The gap runs from `end` (last kernel done) to `start` (next kernel). A sync that began
        # after `start` cannot overlap it; one host thread makes one call at a time, so the last
        # sync to begin before `end` is the earliest that can still be running.
        lo = max(0, bisect.bisect_left(sync_starts, end) - 1)
        hi = bisect.bisect_left(sync_starts, start)
        overlapping = sorted({s[2] for s in syncs[lo:hi] if s[0] + s[1] > end})
        gaps.append((length, stage, overlapping))
    idle = sum(g[0] for g in gaps)
    gaps.sort(reverse=True)
    return {
        "windowMs": round(window / 1000, 2),
        "idleMs": round(idle / 1000, 2),
        "idleFraction": round(idle / window, 3) if window else None,
        "gaps": len(gaps),
        "idleMsByStage": {k: round(v / 1000, 2) for k, v in sorted(by_stage.items(), key=lambda kv: -kv[1])[:top]},
        "largestGaps": [{"ms": round(g[0] / 1000, 2), "stage": g[1], "syncs": g[2]} for g in gaps[:top]],
    }


def main() -> int:
    with gzip.open(sys.argv[1], "rt") as f:
        small = json.load(f)
    print(json.dumps(idle_summary(small), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
