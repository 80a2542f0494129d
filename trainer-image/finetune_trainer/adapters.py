"""Wrap the base model for the fine-tuning method: LoRA, QLoRA, DoRA (PEFT) or full."""

from __future__ import annotations

import logging

import torch

from finetune_trainer.config import MethodConfig
from finetune_trainer.errors import ConfigError

log = logging.getLogger(__name__)


def prepare_for_training(model: torch.nn.Module, method: MethodConfig, enable_checkpointing: bool) -> torch.nn.Module:
    """enable_checkpointing turns gradient checkpointing on for every decoder layer;
    activation_memory.plan then decides which layers keep it."""
    if enable_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (no enable_input_require_grads
        # hack) and with ZeRO-3's parameter gathering.
        if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # the KV cache is for generation, not training

    if method.type == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method.type == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=enable_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    targets = method.lora.target_modules
    lora = LoraConfig(
        r=method.lora.r,
        lora_alpha=method.lora.alpha,
        lora_dropout=method.lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        use_dora=method.type == "dora",
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        if "target modules" in str(exc).lower():
            raise ConfigError(f"method.lora.targetModules: {exc}".splitlines()[0]) from None
        raise
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("%s: %d trainable of %d parameters (%.3f%%)", method.type, trainable, total, 100 * trainable / total)
    return model
