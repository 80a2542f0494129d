"""One benchmark case in its own process (run.py starts one per case, so memory starts clean).

  ours         the trainer itself: finetune_trainer.train.run() on a JSONL file of synthetic
               text, with the trainer's data, packing, collator, PEFT wrapping and DeepSpeed
               engine. The harness only wraps Reporter.step (to read each step's wall time and
               real-token count, which train.py already measures) and build_engine (to reset
               the peak-memory counter once the model is built, so the fp32->bf16 init of the
               random preset does not count as training memory); a profiled case also names
               the trainer's host-side stages for the idle analysis (mark_trainer_stages).
  hf-baseline  what Kaito runs: HF Trainer + PEFT, batch 1, a padding collator
               (DataCollatorForSeq2Seq), no packing, SDPA attention, bf16, same LoRA config.

  --ceiling    a raw bf16 matmul (8192^3, random inputs) median through triton's do_bench.

Writes one JSON object to --result.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "trainer-image"))

from common import PEAK_BF16_FLOPS, Case, flops_per_token, parse_variant, sequence_lengths, synthetic_texts  # noqa: E402

GiB = 1024**3
BASELINE_LORA_DROPOUT = 0.05  # the baseline's LoRA dropout, reported in its rows


def cuda(fn: str, default=0):
    """torch.cuda.<fn>() on a GPU; `default` on CPU (the harness smoke-tests on CPU with tiny-llama)."""
    import torch

    return getattr(torch.cuda, fn)() if torch.cuda.is_available() else default


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def card_family(name: str) -> str:
    for family in PEAK_BF16_FLOPS:
        if family in name:
            return family
    return "H100"


def examples_needed(case: Case, micro_batch: int, lengths_mean: float) -> int:
    steps = case.warmup + case.measure + (2 if case.profile else 0)
    if case.system == "hf-baseline":
        return max(64, 4 * steps)
    if case.data == "fixed":
        return micro_batch * steps + micro_batch
    return int(micro_batch * steps * case.seq_len / lengths_mean * 1.3) + 16


# ---------------------------------------------------------------- profiling helpers


class StepProfiler:
    """Profiles the steps after the measured ones; summarises where GPU time goes and, from
    the trace, where and why the GPU sits idle (trace_gaps.py)."""

    def __init__(self, start_after: int, trace_path: Path | None, active: int = 2):
        self.start_after, self.active, self.prof, self.t0 = start_after, active, None, 0.0
        self.trace_path = trace_path  # where the compact trace is kept (--trace), or None
        self.summary = None

    def on_step_end(self, steps_done: int) -> None:
        import torch

        if self.prof is None and steps_done == self.start_after:
            cuda('synchronize')
            self.prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            )
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif self.prof is not None and self.summary is None and steps_done >= self.start_after + self.active:
            cuda('synchronize')
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            self.summary = summarise_profile(self.prof, wall, self.active, self.trace_path)


def summarise_profile(prof, wall_s: float, steps: int, trace_path: Path | None) -> dict:
    """GPU time by kind and the idle analysis come from the trace's kernel, copy and memset
    events (the profiler's per-name averages also hold the GPU spans of record_function
    annotations, which are not kernels); the top-kernels table is for reading."""
    import gzip

    import trace_gaps

    try:
        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(f"{tmp}/trace.json")
            small = trace_gaps.compact(json.loads(Path(f"{tmp}/trace.json").read_text()))
        if trace_path and os.environ.get("RANK", "0") == "0":  # under torchrun, one process keeps it
            with gzip.open(trace_path, "wt") as f:
                json.dump(small, f)
        summary = {"profiledSteps": steps, "wallSeconds": round(wall_s, 4), **trace_gaps.kernel_summary(small, wall_s)}
        summary["idle"] = trace_gaps.idle_summary(small)
    except Exception as exc:  # a profile must never cost the measurement
        return {"error": repr(exc), "table": ""}
    try:
        summary["table"] = prof.key_averages().table(
            sort_by="self_device_time_total", row_limit=30, max_name_column_width=70
        )
    except Exception as exc:
        summary["table"] = f"(no table: {exc!r})"
    return summary


def mark_trainer_stages() -> None:
    """Name the trainer's host-side stages in the profile (record_function), so idle GPU time
    can be charged to the stage the host was in (trace_gaps.py). Outside the profiled steps a
    record_function costs about a microsecond, a few per step."""
    import functools

    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

    from finetune_trainer import batching, distributed

    def mark(owner, attribute: str, label: str) -> None:
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def marked(*args, **kwargs):
            with torch.profiler.record_function(label):
                return original(*args, **kwargs)

        setattr(owner, attribute, marked)

    mark(batching.Collator, "__call__", "collate")
    mark(DeepSpeedEngine, "forward", "engine.forward")
    mark(DeepSpeedEngine, "backward", "engine.backward")
    mark(DeepSpeedEngine, "step", "engine.step")
    mark(distributed, "all_reduce_sum", "step totals")  # the loop's per-step read of loss and tokens


# ---------------------------------------------------------------- ours


def run_plan_overrides(variant: dict):
    """The variant's runtime choices, which the trainer would otherwise make itself, as overrides
    of its run plan (the plan it returns, and writes to result.json, says what ran)."""
    from finetune_trainer.run_plan import RunPlanOverrides

    deepspeed: dict = {}
    if variant["foreach"]:
        deepspeed["optimizer"] = {"params": {"fused": None}}  # torch AdamW's default: foreach
    if variant["overflowcheck"]:
        deepspeed["bf16"] = {"check_grad_overflow": None}  # DeepSpeed's default: on
    return RunPlanOverrides(
        # The trainer's attention before the varlen kernel: padded packed rows through SDPA
        # (model_loading turns cuDNN SDPA off for it, as the trainer then did).
        attention="sdpa" if variant["sdpa"] else None,
        compile=variant["compile"],
        fused_loss=False if variant["noflce"] else None,
        deepspeed=deepspeed or None,
    )


def run_ours(case: Case, work: Path, trace_path: Path | None) -> dict:
    import torch

    from finetune_trainer import engine as engines
    from finetune_trainer import reporting, train
    from finetune_trainer.config import JobConfig

    variant = parse_variant(case.variant)
    if variant["liger"]:
        # Liger's other Triton kernels, patched into transformers' Llama classes before the
        # trainer builds the model (the trainer itself applies the fused loss).
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
        log("liger kernels applied")
    if variant["memory_cap_gib"] is not None:
        gpu = int(os.environ.get("LOCAL_RANK", "0"))  # under torchrun, this process's own GPU
        total = torch.cuda.get_device_properties(gpu).total_memory
        torch.cuda.set_per_process_memory_fraction(variant["memory_cap_gib"] * GiB / total, gpu)
        log(f"memory capped at {variant['memory_cap_gib']} GiB of {total / GiB:.1f}")
    if case.profile:
        mark_trainer_stages()
    overrides = run_plan_overrides(variant)
    mb = variant["micro_batch"]
    rows_per_step = mb * variant["accumulation"]
    probe = sequence_lengths(case.data, 2000, case.seq_len)
    lengths = sequence_lengths(
        case.data, case.gpus * examples_needed(case, rows_per_step, statistics.mean(probe)), case.seq_len
    )
    texts = synthetic_texts(lengths)
    data_path = work / "train.jsonl"
    with open(data_path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    total_steps = case.warmup + case.measure + (2 if case.profile else 0)
    lora = {"r": case.lora_r, "alpha": 2 * case.lora_r, "targetModules": ["all-linear"]}
    if variant["dropout"] is not None:
        lora["dropout"] = variant["dropout"]
    training = {
        "maxSteps": total_steps,
        "microBatchSize": mb,
        # one micro-batch per process per optimizer step (step time = one fwd/bwd/update),
        # unless the variant accumulates
        "globalBatchSize": rows_per_step * case.gpus,
        "maxSeqLength": case.seq_len,
        "packing": True,
    }
    if variant["gradient_checkpointing"] is not None:
        training["gradientCheckpointing"] = variant["gradient_checkpointing"]
    distributed = dict(case.extra.get("distributed", {}))
    if variant["zero_stage"] is not None:
        distributed["zeroStage"] = variant["zero_stage"]
    if variant["offload"]:
        distributed["offload"] = "optimizer"
    config = JobConfig.model_validate({
        "jobName": "bench",
        "baseModel": {"source": f"preset://{case.model}"},
        "dataset": {"path": str(data_path), "format": "text", "validationSplit": 0},
        "method": {"type": case.method, "lora": lora},
        "training": training,
        "distributed": distributed,
        "output": {"dir": str(work / "out")},
        "checkpointing": {"everySteps": 10**6},
        "reporting": {"progressFile": str(work / "progress.jsonl")},
    })
    steps: list[dict] = []
    peak = {}
    profiler = StepProfiler(case.warmup + case.measure, trace_path) if case.profile else None
    measured_end = case.warmup + case.measure

    original_step = reporting.Reporter.step

    def step(self, **kw):
        steps.append({"seconds": kw["step_seconds"], "tokens": kw["tokens"], "loss": kw["loss"]})
        if len(steps) == measured_end:
            peak["allocated"] = cuda('max_memory_allocated')
            peak["reserved"] = cuda('max_memory_reserved')
        log(f"step {len(steps)}: {kw['step_seconds']:.4f}s {kw['tokens']} tokens loss {kw['loss']:.4f}")
        result = original_step(self, **kw)
        if profiler:
            profiler.on_step_end(len(steps))
        return result

    original_build = engines.build_engine

    def build_engine(model, *args, **kwargs):
        engine = original_build(model, *args, **kwargs)
        cuda('synchronize')
        cuda('reset_peak_memory_stats')
        trainable = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
        log(f"engine built; attention {model.config._attn_implementation}; trainable parameters {trainable}; "
            f"memory now {cuda('memory_allocated') / GiB:.2f} GiB")
        return engine

    reporting.Reporter.step = step
    engines.build_engine = build_engine
    plan = train.run(config, overrides)
    return {
        "steps": steps, "lengths": lengths, "peak": peak, "zeroStage": config.distributed.zero_stage,
        "offload": config.distributed.offload,
        "microBatch": mb, "gpus": case.gpus,
        "gradientCheckpointing": {True: "all", False: "none", None: "auto"}[config.training.gradient_checkpointing],
        "checkpointedLayers": plan.checkpointed_layers,
        "loraDropout": config.method.lora.dropout,
        "compile": plan.compile,
        "attention": plan.attention,
        "fusedLoss": plan.fused_loss,
        "runPlan": plan.model_dump(by_alias=True, mode="json"),
        "memoryCapGiB": variant["memory_cap_gib"],
        "profile": profiler.summary if profiler else None,
    }


# ---------------------------------------------------------------- HF baseline


def run_baseline(case: Case, work: Path, trace_path: Path | None) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from finetune_trainer import data, model_loading, presets
    from finetune_trainer.config import MethodConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if case.method == "qlora":
        saved = work / "preset"
        model_loading.materialize_preset(case.model, device, saved)
        tokenizer = presets.build_tokenizer()
        model = AutoModelForCausalLM.from_pretrained(
            saved, dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": device},
            quantization_config=model_loading._quantization_config(MethodConfig(type="qlora")),
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model, tokenizer = presets.build_preset(case.model, torch.bfloat16, device)
        model.config._attn_implementation = "sdpa"
    model.config.use_cache = False
    if case.method != "full":
        model = get_peft_model(model, LoraConfig(
            r=case.lora_r, lora_alpha=2 * case.lora_r, lora_dropout=BASELINE_LORA_DROPOUT, target_modules="all-linear",
            use_dora=case.method == "dora", task_type="CAUSAL_LM",
        ))
    cuda('synchronize')
    cuda('reset_peak_memory_stats')

    measure = case.measure * 3  # batch-1 steps are short; more of them steady the median
    total_steps = case.warmup + measure + (2 if case.profile else 0)
    lengths = sequence_lengths(case.data, examples_needed(case, 1, 500), case.seq_len)
    texts = synthetic_texts(lengths)
    rows = []
    for t in texts:
        s = data.tokenize({"text": t}, "text", tokenizer, case.seq_len)
        rows.append({"input_ids": s.input_ids, "labels": s.labels, "attention_mask": [1] * len(s.input_ids)})
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")

    step_tokens: list = []
    steps: list[dict] = []
    peak = {}
    measured_end = case.warmup + measure
    profiler = StepProfiler(measured_end, trace_path) if case.profile else None

    def count_tokens(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        step_tokens.append(mask.sum() if mask is not None else kwargs["input_ids"].numel())

    model.register_forward_pre_hook(count_tokens, with_kwargs=True)

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            cuda('synchronize')
            step_tokens.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            cuda('synchronize')
            seconds = time.perf_counter() - self.t0
            tokens = int(sum(int(t) for t in step_tokens))
            steps.append({"seconds": seconds, "tokens": tokens})
            if len(steps) == measured_end:
                peak["allocated"] = cuda('max_memory_allocated')
                peak["reserved"] = cuda('max_memory_reserved')
            if len(steps) % 5 == 0 or len(steps) <= case.warmup:
                log(f"step {len(steps)}: {seconds:.4f}s {tokens} tokens")
            if profiler:
                profiler.on_step_end(len(steps))

    args = TrainingArguments(
        output_dir=str(work / "hf-out"), per_device_train_batch_size=1, gradient_accumulation_steps=1,
        max_steps=total_steps, learning_rate=2e-4, bf16=torch.cuda.is_available(), logging_steps=10**6, save_strategy="no",
        report_to="none", dataloader_num_workers=0, disable_tqdm=True, seed=42,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[Timer()])
    trainer.train()
    return {
        "steps": steps, "lengths": lengths, "peak": peak, "zeroStage": 0, "microBatch": 1, "gpus": 1,
        "gradientCheckpointing": "none", "checkpointedLayers": 0, "loraDropout": BASELINE_LORA_DROPOUT, "compile": False,
        "attention": "sdpa", "measure": measure,
        "profile": profiler.summary if profiler else None,
    }


# ---------------------------------------------------------------- ceiling


def run_ceiling() -> dict:
    import torch
    import triton.testing

    n = 8192
    sets = [(torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16))
            for _ in range(4)]
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    i = [0]

    def mm():
        a, b = sets[i[0] % len(sets)]
        i[0] += 1
        torch.matmul(a, b, out=out)

    times = [triton.testing.do_bench(mm, warmup=200, rep=1000, return_mode="median") for _ in range(2)]
    tflops = [2 * n**3 / (t * 1e-3) / 1e12 for t in times]
    return {"device": torch.cuda.get_device_name(), "shape": f"{n}x{n}x{n} bf16", "tflopsMedianRuns": [round(t, 1) for t in tflops]}


# ---------------------------------------------------------------- main


def summarise(case: Case, raw: dict) -> dict:
    import torch

    from common import model_shape

    measure = raw.get("measure", case.measure)
    measured = raw["steps"][case.warmup : case.warmup + measure]
    if len(measured) < measure:
        raise RuntimeError(f"only {len(raw['steps'])} steps ran, {case.warmup + measure} needed")
    seconds = sum(s["seconds"] for s in measured)
    tokens = sum(s["tokens"] for s in measured)
    gpus = raw["gpus"]
    tps = tokens / seconds / gpus  # tokens are summed over all processes (train.py all-reduces them)
    lengths = raw["lengths"]
    attn_ctx = sum(n * n for n in lengths) / sum(lengths)
    shape = dict(model_shape(case.model))
    flops = flops_per_token(shape, case.lora_r, case.method, attn_ctx)
    device = cuda('get_device_name', 'cpu')
    peak_flops = PEAK_BF16_FLOPS[card_family(device)]
    import peft
    import transformers

    row = {
        "device": device,
        "model": case.model,
        "method": case.method,
        "zeroStage": raw["zeroStage"],
        "gpus": gpus,
        "seqLen": case.seq_len,
        "data": case.data,
        "system": case.system,
        "tokensPerSecPerGpu": round(tps, 1),
        "peakMemGiB": round(raw["peak"]["allocated"] / GiB, 2),
        "mfuMethodAware": round(tps * flops["flopsMethodAware"] / peak_flops, 4),
        "mfu6N": round(tps * flops["flops6N"] / peak_flops, 4),
        # extras
        "variant": case.variant if case.system == "ours" else "kaito-defaults",
        "microBatch": raw["microBatch"],
        "offload": raw.get("offload", "none"),
        "gradientCheckpointing": raw["gradientCheckpointing"],
        "checkpointedLayers": raw["checkpointedLayers"],
        "loraDropout": raw["loraDropout"],
        "compile": raw["compile"],
        "attention": raw["attention"],
        "fusedLoss": raw.get("fusedLoss", False),
        **({"memoryCapGiB": raw["memoryCapGiB"]} if raw.get("memoryCapGiB") else {}),
        **({"runPlan": raw["runPlan"]} if raw.get("runPlan") else {}),  # ours: the trainer's whole plan
        "stepTimeMedianS": round(statistics.median(s["seconds"] for s in measured), 4),
        "realTokensPerStepMean": round(tokens / len(measured), 1),
        "measuredSteps": len(measured),
        "warmupStepsSkipped": case.warmup,
        "peakReservedGiB": round(raw["peak"]["reserved"] / GiB, 2),
        "gflopsPerTokenMethodAware": round(flops["flopsMethodAware"] / 1e9, 2),
        "gflopsPerToken6N": round(flops["flops6N"] / 1e9, 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "case": case.name,
        **({"call": os.environ["BENCH_CALL"]} if os.environ.get("BENCH_CALL") else {}),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if raw.get("profile"):
        prof = dict(raw["profile"])
        print("\n=== profile: top kernels over", prof["profiledSteps"], "steps ===\n" + prof.pop("table"), flush=True)
        row["profile"] = prof
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case")
    parser.add_argument("--ceiling", action="store_true")
    parser.add_argument("--result", required=True)
    parser.add_argument("--trace", type=Path, help="where a profiled case writes its compact trace (.json.gz)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The trainer's own log (the activation-memory plan, the data plan) goes into the raw log too.
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    if args.ceiling:
        out = run_ceiling()
        log(f"matmul ceiling: {out}")
    else:
        case = Case.from_json(args.case)
        log(f"case {case.name}: {case.to_json()}")
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            raw = (run_ours if case.system == "ours" else run_baseline)(case, Path(tmp), args.trace)
        out = summarise(case, raw)
        log("result " + json.dumps({k: v for k, v in out.items() if k != "profile"}))
    if os.environ.get("RANK", "0") == "0":  # under torchrun every process runs the case; one reports
        Path(args.result).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
