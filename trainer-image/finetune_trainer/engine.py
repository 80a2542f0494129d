"""The DeepSpeed engine: ZeRO stage, offload, precision and optimizer from the job config.

The same engine runs every stage (0-3) on GPUs (NCCL) and on CPUs (DeepSpeed's CPU
accelerator with gloo), so there is one training path everywhere.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import get_scheduler

from finetune_trainer.batching import StepPlan
from finetune_trainer.config import JobConfig

SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def deepspeed_config(config: JobConfig, plan: StepPlan, device: torch.device) -> dict[str, Any]:
    training, distributed = config.training, config.distributed
    on_gpu = device.type == "cuda"
    offload = distributed.offload != "none"
    zero: dict[str, Any] = {
        "stage": distributed.zero_stage,
        # Without this, ZeRO-3 saves adapters as empty tensors (see research notes); we gather
        # ourselves in outputs.gather_state_dict, but keep the engine's own save correct too.
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if distributed.offload == "parameters":
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}

    # On GPU with offload, DeepSpeed's vectorised CPU Adam (the image prebuilds the op).
    # Everywhere else torch's AdamW: it needs no compiled op (FusedAdam would JIT-build
    # with nvcc), and on CPU-only nodes it is what the offloaded optimizer runs.
    use_torch_adam = not (on_gpu and offload)
    ds_config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": plan.accumulation_steps,
        "train_batch_size": plan.global_batch_size,  # the resolved one, when the spec says auto
        "zero_optimization": zero,
        # DeepSpeed's bf16 overflow check tests every gradient tensor for inf/NaN, one by one
        # (about a dozen kernel launches per tensor: 5,400 a step for an 8B LoRA's 448), then
        # reads the answer back; the GPU idles meanwhile (bench/README.md has the profile).
        # bf16 has fp32's range, so there is no loss scale to adjust: train.check_finite
        # instead fails the run, before anything is saved, once the loss or the gradient norm
        # stops being finite.
        "bf16": {"enabled": on_gpu, "check_grad_overflow": False},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": training.learning_rate,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": training.weight_decay,
                **({"torch_adam": True} if use_torch_adam else {}),
                # One kernel for the whole update instead of one pass per Adam term; on a full
                # fine-tune the update's memory traffic is a large share of a step.
                **({"fused": True} if use_torch_adam and on_gpu else {}),
            },
        },
        "steps_per_print": 10**9,  # our reporter prints progress
        "wall_clock_breakdown": False,
    }
    if use_torch_adam and offload:
        ds_config["zero_force_ds_cpu_optimizer"] = False
    if training.max_grad_norm > 0:
        ds_config["gradient_clipping"] = training.max_grad_norm
    return ds_config


def cast_like_engine(model: torch.nn.Module, device: torch.device) -> None:
    """Give every floating-point parameter the dtype the engine will give it (bf16 on GPUs;
    DeepSpeed casts them when it wraps the model). Done before compiling and the memory probe,
    so both see the final dtypes: PEFT makes adapters fp32, and a graph compiled for fp32
    adapters fails once the engine has made them bf16."""
    if device.type != "cuda":
        return
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.dtype != torch.bfloat16:
            parameter.data = parameter.data.to(torch.bfloat16)


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any], config: JobConfig, plan: StepPlan):
    """The engine for `ds_config` (the run plan's, which deepspeed_config proposed)."""
    import deepspeed

    def scheduler(optimizer):
        return get_scheduler(
            SCHEDULERS[config.training.lr_scheduler],
            optimizer,
            num_warmup_steps=config.training.warmup_steps,
            num_training_steps=plan.total_steps,
        )

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=copy.deepcopy(ds_config),  # DeepSpeed adds its own keys to the dict it is given
        lr_scheduler=scheduler,
    )
    return engine
