"""The loss without the logits: Liger's fused linear + cross-entropy on GPUs.

With a 128k vocabulary the logits are the largest activation of a step: a packed micro-batch
of 8,192 tokens holds 8,192 x 128,256 bf16 logits, the loss's fp32 copy of them and that
copy's gradient, several GiB at once. Liger's kernel runs the LM head and the cross-entropy
chunk by chunk and writes the head's gradients as it goes, so none of that is ever held.

What it buys is memory, and the activation planner spends memory on speed: fewer
checkpointed layers where the card is short. Same-call A/Bs on an H200 (bench/README.md):
- 3B full at the default global batch with memory capped at 78 GiB (an 80 GB card's share):
  1 layer checkpointed instead of 17, 23,682 tok/s against 21,071 (+12%);
- 8B LoRA: 15,064 tok/s against 14,821 (+1.6%), peak 50.8 GiB against 61.5;
- 3B full where memory is plentiful: 23,932 against 24,339 (-1.7%): the kernels take the same
  time, but the chunk loop runs on the host and the GPU idles a little more.
It is on in all three. Using it only where memory is short would take a second memory probe
per job to win back the 1.7%, and would give up LoRA's 1.6%.
"""

from __future__ import annotations

import inspect
import logging

import torch

log = logging.getLogger(__name__)


def wanted(device: torch.device, zero_stage: int) -> bool:
    """GPUs only (Triton kernels). Not under ZeRO-3: the fused kernel reads lm_head.weight
    itself instead of calling the head module, so ZeRO-3's hooks would never gather that
    partitioned weight."""
    return device.type == "cuda" and zero_stage < 3


def apply(model: torch.nn.Module) -> bool:
    """Route the model's loss through the fused kernel, in place; False (and the model
    untouched) for an architecture Liger does not cover. Call it on the bare causal LM,
    before PEFT wraps it: PEFT's wrapper calls this instance's forward."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(model.config, "model_type", None)
    apply_to = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    # Each architecture's patch function also swaps in other kernels (RMSNorm, RoPE, SwiGLU,
    # GeGLU...) unless told not to, and their sets differ: turn off every switch but this one.
    switches = {
        name: name == "fused_linear_cross_entropy"
        for name, parameter in (inspect.signature(apply_to).parameters.items() if apply_to else ())
        if isinstance(parameter.default, bool)
    }
    if not switches.get("fused_linear_cross_entropy"):
        log.info("fused linear + cross-entropy: not available for model type %s; logits are materialised", model_type)
        return False
    apply_to(model=model, **switches)
    log.info("fused linear + cross-entropy: on (%s)", model_type)
    return True
