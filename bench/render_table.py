"""Render bench/results/summary.json (and ceilings.json) as Markdown tables.

  python bench/render_table.py                 # print
  python bench/render_table.py --write bench/README.md   # replace the block between the markers

Every number in the generated block comes from the JSON files; nothing is typed in by hand.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- BEGIN GENERATED (bench/render_table.py) -->", "<!-- END GENERATED -->"

# Goals of issue 7 (8B LoRA r16, seq 2048, one H100), checked against the rows.
GOAL_FIXED_TPS = 14_000
GOAL_VARIABLE_TPS = 12_000
GOAL_VARIABLE_X_HF = 10


def fmt_int(x):
    return f"{x:,.0f}"


def pct(x):
    return f"{100 * x:.1f}%"


def cudnn(r):
    v = r.get("cudnnSdpa")
    return "?" if v is None else ("on" if v else "off")


def key(r):
    return (r["runId"], r["model"], r["method"], r["seqLen"], r["data"])


def render(rows: list[dict], ceilings: list[dict]) -> str:
    out = []
    baselines = {key(r): r for r in rows if r["system"] == "hf-baseline"}

    out.append("### Results (one GPU each; `zeroStage` 0 for the baseline means no DeepSpeed)\n")
    out.append("| run | device | model | method | seq | data | system | variant | micro | ckpt | cuDNN SDPA | ZeRO | real tok/s/GPU | x HF same run | step median s | real tok/step | peak GiB | MFU method-aware | MFU 6N |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = baselines.get(key(r))
        ratio = f"{r['tokensPerSecPerGpu'] / base['tokensPerSecPerGpu']:.2f}x" if base and r["system"] == "ours" else ""
        out.append(
            f"| {r['runId']} | {r['device']} | {r['model']} | {r['method']} | {r['seqLen']} | {r['data']} | {r['system']} "
            f"| {r['variant']} | {r['microBatch']} | {'on' if r['gradientCheckpointing'] else 'off'} | {cudnn(r)} | {r['zeroStage']} "
            f"| {fmt_int(r['tokensPerSecPerGpu'])} | {ratio} | {r['stepTimeMedianS']:.3f} | {fmt_int(r['realTokensPerStepMean'])} "
            f"| {r['peakMemGiB']:.1f} | {pct(r['mfuMethodAware'])} | {pct(r['mfu6N'])} |"
        )

    out.append("\n### bf16 matmul ceiling (8192x8192x8192, random inputs, median of do_bench)\n")
    out.append("| run | device | TFLOP/s (two timings) | of 989.4 dense peak |")
    out.append("|---|---|---|---|")
    for c in ceilings:
        t = c["tflopsMedianRuns"]
        out.append(f"| {c['time']} | {c['device']} | {', '.join(f'{x:.1f}' for x in t)} | {pct(max(t) / 989.4)} |")

    profiled = [r for r in rows if r.get("profile") and "gpuBusyFraction" in r["profile"]]
    if profiled:
        out.append("\n### Profiles (2 steps after the measured ones; torch.profiler; full kernel tables in `results/raw/`)\n")
        out.append("| run | case | wall s | GPU kernel s | GPU busy | kernel launches | GPU s by kind |")
        out.append("|---|---|---|---|---|---|---|")
        for r in profiled:
            p = r["profile"]
            kinds = ", ".join(f"{k} {v:.3f}" for k, v in p["gpuSecondsByKind"].items())
            out.append(f"| {r['runId']} | {r['case']} | {p['wallSeconds']:.2f} | {p['gpuKernelSeconds']:.2f} | "
                       f"{pct(p['gpuBusyFraction'])} | {p['kernelLaunches']:,} | {kinds} |")

    out.append("\n### Issue 7 goals (8B LoRA r16, seq 2048, one H100), best row of each kind\n")
    out.append("| goal | best measured | met |")
    out.append("|---|---|---|")

    def best(pred):
        c = [r for r in rows if pred(r)]
        return max(c, key=lambda r: r["tokensPerSecPerGpu"]) if c else None

    def is_8b(r, data):
        return (r["model"] == "llama-8b" and r["method"] == "lora" and r["seqLen"] == 2048 and r["data"] == data
                and r["system"] == "ours" and "H100" in r["device"])

    b = best(lambda r: is_8b(r, "fixed"))
    out.append(f"| fixed data >= {GOAL_FIXED_TPS:,} tok/s/GPU (~45% method-aware MFU) | "
               + (f"{fmt_int(b['tokensPerSecPerGpu'])} ({b['variant']}, {pct(b['mfuMethodAware'])}) | "
                  f"{'yes' if b['tokensPerSecPerGpu'] >= GOAL_FIXED_TPS else 'no'} |" if b else "not measured | no |"))
    b = best(lambda r: is_8b(r, "variable"))
    out.append(f"| variable mix >= {GOAL_VARIABLE_TPS:,} real tok/s/GPU | "
               + (f"{fmt_int(b['tokensPerSecPerGpu'])} ({b['variant']}) | "
                  f"{'yes' if b['tokensPerSecPerGpu'] >= GOAL_VARIABLE_TPS else 'no'} |" if b else "not measured | no |"))
    same_run = [(r, baselines[key(r)]) for r in rows if is_8b(r, "variable") and key(r) in baselines]
    if same_run:
        r, base = max(same_run, key=lambda rb: rb[0]["tokensPerSecPerGpu"] / rb[1]["tokensPerSecPerGpu"])
        x = r["tokensPerSecPerGpu"] / base["tokensPerSecPerGpu"]
        out.append(f"| variable mix >= {GOAL_VARIABLE_X_HF}x HF baseline, same run | {x:.2f}x ({r['variant']}, run {r['runId']}) | "
                   f"{'yes' if x >= GOAL_VARIABLE_X_HF else 'no'} |")
    else:
        out.append(f"| variable mix >= {GOAL_VARIABLE_X_HF}x HF baseline, same run | not measured | no |")
    q = best(lambda r: r["model"] == "llama-8b" and r["method"] == "qlora" and r["system"] == "ours")
    out.append("| QLoRA >= 0.75x LoRA, peak memory reported | " + (fmt_int(q["tokensPerSecPerGpu"]) if q else "not measured") + " | "
               + ("see rows" if q else "no") + " |")
    f3 = best(lambda r: r["model"] == "llama-3b" and r["method"] == "full")
    out.append("| full fine-tune 3B >= 45% MFU | " + (pct(f3["mfuMethodAware"]) if f3 else "not measured") + " | "
               + ("yes" if f3 and f3["mfuMethodAware"] >= 0.45 else "no") + " |")
    z2 = [r for r in rows if r["gpus"] == 2]
    out.append("| ZeRO-2 on 2 GPUs >= 90% scaling | " + ("see rows" if z2 else "not measured") + " | " + ("see rows" if z2 else "no") + " |")
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--write", help="a Markdown file holding the BEGIN/END markers")
    args = p.parse_args()
    results = Path(args.results)
    rows = json.loads((results / "summary.json").read_text())
    ceilings = json.loads((results / "ceilings.json").read_text()) if (results / "ceilings.json").exists() else []
    text = render(rows, ceilings)
    if not args.write:
        print(text)
        return 0
    path = Path(args.write)
    doc = path.read_text()
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    path.write_text(doc[:start] + "\n" + text + doc[end:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
