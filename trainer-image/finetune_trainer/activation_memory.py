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
the peak of every count. The engine's own needs (master weights, optimizer state, gradient
partitions and buckets) and a margin are set aside from the GPU's memory; the fewest
checkpointed layers whose peak fits in the rest win.
"""

from __future__ import annotations

import gc
import logging

import torch

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


def engine_reserve_bytes(trainable_params: int, zero_stage: int, world_size: int, offload: bool) -> float:
    """GPU memory the DeepSpeed engine adds after the probe, per trainable parameter: fp32
    master weight (4 bytes), Adam's two moments (8) and the fp32 gradient partition the update
    reads (4); partitioned across processes from ZeRO-1 on, on the CPU with offload. Plus the
    bf16 reduce and all-gather buckets. (The probe's backward already held bf16 gradients.)"""
    per_process = 0.0 if offload else 16.0 * trainable_params
    if zero_stage >= 1:
        per_process /= world_size
    return per_process + ENGINE_BUCKET_BYTES


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


def plan(model, collate, config, rows_tokens: list[int], world_size: int, device: torch.device) -> int:
    """Choose and apply how many decoder layers are checkpointed; returns the count.

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
        count = _measured_plan(model, collate, config, rows_tokens, world_size, device, layers)
    set_checkpointed_layers(model, count)
    return count


def _measured_plan(model, collate, config, rows_tokens, world_size, device, layers) -> int:
    training = config.training
    tokens = sum(sorted(rows_tokens, reverse=True)[: training.micro_batch_size])
    vocab = model.get_input_embeddings().weight.shape[0]
    rows = synthetic_rows(tokens, training.max_seq_length, vocab)
    peak_all, other = measure(model, collate, rows, device)
    if peak_all is None:
        log.warning("gradient checkpointing: every layer; even so a micro-batch of %d tokens ran out of memory", tokens)
        return layers
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_memory = torch.cuda.get_device_properties(device).total_memory
    budget = (
        total_memory * (1 - FRAGMENTATION_MARGIN)
        - torch.cuda.memory_allocated(device)
        - engine_reserve_bytes(trainable, config.distributed.zero_stage, world_size, config.distributed.offload != "none")
    )
    count = layers_to_checkpoint(layers, peak_all, other, budget)
    log.info(
        "gradient checkpointing: %d of %d layers for micro-batches of up to %d tokens (peak %.1f GiB with "
        "all, %s; %.1f GiB budget)",
        count, layers, tokens, peak_all / 2**30,
        f"{other[1] / 2**30:.1f} GiB with {other[0]}" if other else "out of memory with fewer",
        budget / 2**30,
    )
    return count
