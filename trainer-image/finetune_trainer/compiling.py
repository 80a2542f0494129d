"""torch.compile over each decoder layer (regional compilation).

What it buys: the layer's elementwise chain (RMSNorm's fp32 round trip, RoPE, SiLU x up,
the LoRA scale-and-add into the base output, residual adds) becomes a few fused kernels
instead of dozens, each of which read and wrote the full activation (bench/README.md,
profile). Compiling layer by layer rather than the whole model keeps the compile to one
graph that every layer reuses, and leaves the loss, the varlen boundaries and DeepSpeed
outside the graph.

Shapes: a packed micro-batch has a different token count every step, so the layers are
compiled dynamic from the start instead of recompiling on the second shape.
"""

from __future__ import annotations

import logging

import torch

from finetune_trainer.activation_memory import checkpointable_layers

log = logging.getLogger(__name__)


def wanted(setting: bool | None, method: str, zero_stage: int, device: torch.device) -> bool:
    """training.compile, where null means: on for the GPU configurations the benchmark ran
    compiled (LoRA, QLoRA and full with ZeRO 0-2). DoRA and ZeRO-3 (whose parameter-gathering
    hooks would fire inside the compiled graph) stay eager until a benchmark shows compile
    works and pays there."""
    if setting is not None:
        return setting
    return device.type == "cuda" and method in ("lora", "qlora", "full") and zero_stage <= 2


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """Compile every decoder layer in place; returns how many were compiled."""
    import torch._dynamo

    # A graph dynamo cannot compile runs eagerly (logged) instead of failing the job.
    torch._dynamo.config.suppress_errors = True
    layers = checkpointable_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    log.info("torch.compile: %d decoder layers (dynamic shapes)", len(layers))
    return len(layers)
