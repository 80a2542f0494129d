"""Gradient checkpointing only where memory needs it (training.gradientCheckpointing unset).

Checkpointing a decoder layer keeps only its input and recomputes the rest in backward:
about a third more compute for that layer. On the benchmark's 8B LoRA it cost more than any
other default (bench/README.md), so the trainer checkpoints the fewest layers that let the
largest micro-batch fit.

How many is measured, not guessed from a formula: before the engine is built, the model runs
forward and backward on a few synthetic tokens, three times (no checkpointing at two sizes,
full checkpointing at one). Peak memory is linear in tokens for a padding-free batch, so
these give a fixed cost plus a per-token cost with and without checkpointing. The engine's
own needs (optimizer state, master weights, gradient buckets) and a margin are set aside
from the GPU's free memory, and the rest decides how many layers keep their activations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from finetune_trainer.data import IGNORE_INDEX, Sequence

log = logging.getLogger(__name__)

FRAGMENTATION_MARGIN = 0.10  # of the GPU's memory, for allocator fragmentation and spikes
ENGINE_BUCKET_BYTES = 2 * 500_000_000 * 2  # DeepSpeed's default reduce + allgather buckets, bf16


@dataclass(frozen=True)
class ActivationProfile:
    fixed_bytes: float  # independent of tokens (gradients of trainable weights, workspaces)
    per_token_bytes: float  # no layer checkpointed
    per_token_bytes_checkpointed: float  # every layer checkpointed


def checkpointable_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_checkpointed_layers(model: torch.nn.Module, count: int) -> None:
    """Checkpoint the first `count` decoder layers and no others (checkpointing must be enabled)."""
    for index, layer in enumerate(checkpointable_layers(model)):
        layer.gradient_checkpointing = index < count


def layers_to_checkpoint(profile: ActivationProfile, tokens: int, budget_bytes: float, layers: int) -> int:
    """The fewest checkpointed layers (0..layers) whose predicted peak fits in budget_bytes."""
    saved_per_layer = (profile.per_token_bytes - profile.per_token_bytes_checkpointed) / layers
    for count in range(layers + 1):
        per_token = profile.per_token_bytes - count * saved_per_layer
        if profile.fixed_bytes + tokens * per_token <= budget_bytes:
            return count
    return layers


def engine_reserve_bytes(trainable_params: int, zero_stage: int, world_size: int, offload: bool) -> float:
    """GPU memory the DeepSpeed engine adds after the probe: fp32 master weights and Adam's two
    moments (partitioned from ZeRO-1 on; on the CPU with offload), plus gradient buckets."""
    optimizer_bytes = 0 if offload else 12 * trainable_params
    if zero_stage >= 1:
        optimizer_bytes /= world_size
    return optimizer_bytes + ENGINE_BUCKET_BYTES


def _peak_bytes(model, collate, tokens: int, seq_len: int, vocab: int, device) -> int:
    generator = torch.Generator().manual_seed(0)
    sequences = []
    left = tokens
    while left > 0:
        length = min(seq_len, left)
        ids = torch.randint(0, vocab, (length,), generator=generator).tolist()
        sequences.append(Sequence(input_ids=ids, labels=[IGNORE_INDEX] + ids[1:]))
        left -= length
    rows = [[s] for s in sequences]
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    loss = model(**collate(rows, device)).loss
    loss.backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del loss
    for parameter in model.parameters():
        parameter.grad = None
    return peak


def profile(model, collate, seq_len: int, probe_tokens: int, vocab: int, device) -> ActivationProfile:
    model.train()
    set_checkpointed_layers(model, 0)
    small = _peak_bytes(model, collate, probe_tokens, seq_len, vocab, device)
    large = _peak_bytes(model, collate, 2 * probe_tokens, seq_len, vocab, device)
    set_checkpointed_layers(model, len(checkpointable_layers(model)))
    checkpointed = _peak_bytes(model, collate, probe_tokens, seq_len, vocab, device)
    per_token = (large - small) / probe_tokens
    fixed = max(0.0, small - probe_tokens * per_token)
    per_token_checkpointed = max(0.0, (checkpointed - fixed) / probe_tokens)
    torch.cuda.empty_cache()
    return ActivationProfile(fixed, per_token, min(per_token, per_token_checkpointed))


def plan(model, collate, config, rows_tokens: list[int], world_size: int, device: torch.device) -> int:
    """Choose and apply how many decoder layers are checkpointed; returns the count.

    `rows_tokens` are the training rows' lengths: the largest micro-batch is at most the sum
    of the micro-batch size's largest rows, which for short examples is far below
    microBatchSize x maxSeqLength.
    """
    training, distributed = config.training, config.distributed
    layers = len(checkpointable_layers(model))
    if training.gradient_checkpointing is not None:
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
    micro = training.micro_batch_size
    tokens = sum(sorted(rows_tokens, reverse=True)[:micro])
    probe_tokens = max(64, min(1024, tokens // 4))
    vocab = model.get_input_embeddings().weight.shape[0]
    measured = profile(model, collate, training.max_seq_length, probe_tokens, vocab, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_memory = torch.cuda.get_device_properties(device).total_memory
    budget = (
        total_memory * (1 - FRAGMENTATION_MARGIN)
        - torch.cuda.memory_allocated(device)
        - engine_reserve_bytes(trainable, config.distributed.zero_stage, world_size, config.distributed.offload != "none")
    )
    count = layers_to_checkpoint(measured, tokens, budget, layers)
    log.info(
        "gradient checkpointing: %d of %d layers for micro-batches of up to %d tokens "
        "(measured %.0f KiB/token without, %.0f KiB/token with; %.1f GiB budget)",
        count, layers, tokens, measured.per_token_bytes / 2**10,
        measured.per_token_bytes_checkpointed / 2**10, budget / 2**30,
    )
    return count
