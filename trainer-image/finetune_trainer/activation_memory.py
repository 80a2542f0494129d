"""Gradient checkpointing only where memory needs it (training.gradientCheckpointing unset).

Checkpointing a decoder layer keeps only its input and recomputes the rest in backward. For
LoRA, whose backward computes no weight gradients of the frozen base, that is half as much
again of the layer's compute, so the trainer checkpoints the fewest layers that let the
largest micro-batch fit (on the benchmark's 8B LoRA this was the largest cost after the
attention, bench/README.md).

How many is measured, not guessed from a formula: before the engine is built, the model (already
compiled, if it is) runs forward and backward on a synthetic micro-batch of the largest size
the data holds, once with every layer checkpointed and once with none (or half, if none runs
out of memory). Peak memory is linear in the number of checkpointed layers, so two points give
the peak of every count. The engine's own needs (master weights, optimizer state, accumulated
gradients and buckets) and a margin are set aside from the GPU's memory; the fewest
checkpointed layers whose peak fits in the rest win.
"""

from __future__ import annotations

import gc
import logging

import torch

from finetune_trainer.batching import StepPlan
from finetune_trainer.data import IGNORE_INDEX, Sequence

log = logging.getLogger(__name__)

FRAGMENTATION_MARGIN = 0.10  # of the GPU's memory, for allocator fragmentation and spikes
ENGINE_BUCKET_BYTES = 2 * 500_000_000 * 2  # DeepSpeed's default reduce + allgather buckets, bf16


def checkpointable_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_checkpointed_layers(model: torch.nn.Module, count: int) -> None:
    """Checkpoint the first `count` decoder layers and no others (checkpointing must be enabled)."""
    for index, layer in enumerate(checkpointable_layers(model)):
        layer.gradient_checkpointing = index < count


def layers_to_checkpoint(layers: int, peak_all: float, other: tuple[int, float] | None, budget_bytes: float) -> int:
    """The fewest checkpointed layers (0..layers) whose peak fits in budget_bytes.

    peak_all: measured peak with every layer checkpointed; other: (count, peak) measured with
    fewer layers checkpointed, or None when that ran out of memory. Peak is linear in count.
    """
    if other is None:
        return layers
    count, peak = other
    saved_per_layer = (peak - peak_all) / (layers - count)
    for candidate in range(layers + 1):
        if peak_all + (layers - candidate) * max(saved_per_layer, 0.0) <= budget_bytes:
            return candidate
    return layers


def engine_reserve_bytes(trainable_params: int, zero_stage: int, world_size: int, offload: bool,
                         accumulates: bool) -> float:
    """GPU memory the DeepSpeed engine holds through forward and backward beyond what the probe
    saw, where the activations peak:
    - the fp32 master weights and Adam's two moments, 12 bytes per trainable parameter,
      partitioned across processes from ZeRO-1 on, on the CPU with offload;
    - with gradient accumulation, the bf16 gradients summed over the micro-batches so far,
      2 bytes per parameter (not divided: a conservative bound for ZeRO-2's partition);
    - the bf16 reduce and all-gather buckets.
    The fp32 gradient partition (4 more bytes) exists only inside the optimizer step, when the
    activations are gone (DeepSpeed's ZeRO-1/2 step creates and frees it), so it does not add
    to the activations' peak. Checked against 3B full on an H200 (bench/README.md): weights,
    this reserve and the probe's peak come to about 1.8 GiB above the measured peak with the
    logits materialised and about 1.5 GiB below it with the fused loss, with one micro-batch
    per step and with eight; the 10% margin covers both."""
    per_process = 0.0 if offload else 12.0 * trainable_params
    if zero_stage >= 1:
        per_process /= world_size
    if accumulates and not offload:
        per_process += 2.0 * trainable_params
    return per_process + ENGINE_BUCKET_BYTES


def usable_memory_bytes(device: torch.device) -> float:
    """The GPU's memory this process may allocate: all of it, unless capped with
    torch.cuda.set_per_process_memory_fraction (a GPU shared with another process)."""
    total = torch.cuda.get_device_properties(device).total_memory
    return total * torch.cuda.get_per_process_memory_fraction(device)


def synthetic_rows(tokens: int, seq_len: int, vocab: int) -> list[list[Sequence]]:
    generator = torch.Generator().manual_seed(0)
    rows, left = [], tokens
    while left > 0:
        length = min(seq_len, left)
        ids = torch.randint(0, vocab, (length,), generator=generator).tolist()
        rows.append([Sequence(input_ids=ids, labels=[IGNORE_INDEX] + ids[1:])])
        left -= length
    return rows


def peak_bytes(model, collate, rows, device) -> int | None:
    """Peak memory of one forward and backward over rows, above what is allocated now; None if
    it runs out of memory (nothing is kept: the engine does not exist yet)."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        model(**collate(rows, device)).loss.backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    except torch.OutOfMemoryError:
        peak = None
    for parameter in model.parameters():
        parameter.grad = None
    gc.collect()  # the exception's frames held activations
    torch.cuda.empty_cache()
    return peak


def measure(model, collate, rows, device) -> tuple[float | None, tuple[int, float] | None]:
    """(peak with every layer checkpointed, (count, peak) with none or else half checkpointed)."""
    model.train()
    layers = len(checkpointable_layers(model))
    set_checkpointed_layers(model, layers)
    peak_all = peak_bytes(model, collate, rows, device)
    if peak_all is None:
        return None, None
    for count in (0, layers // 2):
        set_checkpointed_layers(model, count)
        peak = peak_bytes(model, collate, rows, device)
        if peak is not None:
            return peak_all, (count, peak)
    return peak_all, None


def plan(model, collate, config, rows_tokens: list[int], step_plan: StepPlan, device: torch.device) -> int:
    """How many decoder layers to checkpoint (planning.plan_run records it; train.py applies it
    with set_checkpointed_layers: the probe leaves the layers in whatever state it measured last).

    `step_plan` gives the process count and the micro-batches a step accumulates, which
    decide what the engine holds beside the activations.

    `rows_tokens` are the training rows' lengths: the largest micro-batch is at most the sum
    of the micro-batch size's largest rows, which for short examples is far below
    microBatchSize x maxSeqLength.
    """
    training, distributed = config.training, config.distributed
    layers = len(checkpointable_layers(model))
    if layers == 0:  # a model without transformers' checkpointable decoder layers
        count = 0
    elif training.gradient_checkpointing is not None:
        count = layers if training.gradient_checkpointing else 0
    elif device.type != "cuda":
        # Host memory holds the activations on CPU nodes, and CPU-sized models rarely fill it.
        count = 0
    elif distributed.zero_stage == 3 or distributed.offload != "none":
        # Sharded or offloaded weights are chosen for memory, and ZeRO-3 gathers weights inside
        # the forward, which a probe outside the engine cannot reproduce: checkpoint everything.
        count = layers
    else:
        count = _measured_plan(model, collate, config, rows_tokens, step_plan, device, layers)
    return count


def _measured_plan(model, collate, config, rows_tokens, step_plan: StepPlan, device, layers) -> int:
    training = config.training
    tokens = sum(sorted(rows_tokens, reverse=True)[: training.micro_batch_size])
    vocab = model.get_input_embeddings().weight.shape[0]
    rows = synthetic_rows(tokens, training.max_seq_length, vocab)
    peak_all, other = measure(model, collate, rows, device)
    if peak_all is None:
        log.warning("gradient checkpointing: every layer; even so a micro-batch of %d tokens ran out of memory", tokens)
        return layers
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    reserve = engine_reserve_bytes(
        trainable, config.distributed.zero_stage, step_plan.world_size, config.distributed.offload != "none",
        accumulates=step_plan.accumulation_steps > 1,
    )
    budget = usable_memory_bytes(device) * (1 - FRAGMENTATION_MARGIN) - torch.cuda.memory_allocated(device) - reserve
    count = layers_to_checkpoint(layers, peak_all, other, budget)
    log.info(
        "gradient checkpointing: %d of %d layers for micro-batches of up to %d tokens (peak %.1f GiB with "
        "all, %s; %.1f GiB budget)",
        count, layers, tokens, peak_all / 2**30,
        f"{other[1] / 2**30:.1f} GiB with {other[0]}" if other else "out of memory with fewer",
        budget / 2**30,
    )
    return count
