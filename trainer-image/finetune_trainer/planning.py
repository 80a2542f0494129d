"""Every runtime choice of a run, decided here and frozen in a `RunPlan` (run_plan.py).

The choices come in two groups because one of them is measured on the model the others build:

  choose_model    before the model loads: the attention kernel (a load argument), the fused
                  loss (patched into the bare model), whether its layers can checkpoint at all
                  (set when PEFT wraps it) and torch.compile (applied to its layers);
  plan_run        once the model is built so: how many layers are checkpointed
                  (activation_memory measures it on that model), the DeepSpeed config, and the
                  facts the rest of the run reads (precision, world size, accumulation).

Each choice is the trainer's own helper (attention.choose, fused_loss.wanted, compiling.wanted,
activation_memory.plan, engine.deepspeed_config) unless a `RunPlanOverrides` sets it; the
helpers decide nothing else, so what ran is exactly what the plan says.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from finetune_trainer import activation_memory, attention, compiling, engine as engines, fused_loss
from finetune_trainer.batching import StepPlan
from finetune_trainer.config import JobConfig
from finetune_trainer.distributed import Distributed
from finetune_trainer.errors import ConfigError
from finetune_trainer.model_loading import training_dtype
from finetune_trainer.run_plan import RunPlan, RunPlanOverrides


@dataclass(frozen=True)
class ModelChoices:
    """What the model is built with; plan_run copies it into the RunPlan."""

    attention: str
    fused_loss: bool
    compile: bool
    checkpointing: bool  # any layer may checkpoint; plan_run decides how many do


def choose_model(config: JobConfig, device: torch.device, overrides: RunPlanOverrides) -> ModelChoices:
    zero_stage = config.distributed.zero_stage
    if overrides.checkpointed_layers is not None:
        checkpointing = overrides.checkpointed_layers > 0
    else:
        checkpointing = config.training.gradient_checkpointing is not False  # None: as memory needs
    chosen = ModelChoices(
        attention=overrides.attention or attention.choose(device),
        fused_loss=_given(overrides.fused_loss, lambda: fused_loss.wanted(device, zero_stage)),
        compile=_given(
            overrides.compile,
            lambda: compiling.wanted(config.training.compile, config.method.type, zero_stage, device),
        ),
        checkpointing=checkpointing,
    )
    if chosen.attention == attention.PACKED_ATTENTION:
        attention.register()  # transformers must know the name before the model loads
    return chosen


def plan_run(config: JobConfig, dist: Distributed, steps: StepPlan, built: ModelChoices, model, collate,
             rows_tokens: list[int], overrides: RunPlanOverrides) -> RunPlan:
    """The whole plan, for a model already built as `built` says (and compiled, if it is: compiled
    layers keep fewer activations, which the checkpointing probe must see). Nothing is applied
    here; train.py applies the checkpointed-layer count."""
    layers = len(activation_memory.checkpointable_layers(model))
    if overrides.checkpointed_layers is None:
        checkpointed = activation_memory.plan(model, collate, config, rows_tokens, steps, dist.device)
    elif overrides.checkpointed_layers <= layers:
        checkpointed = overrides.checkpointed_layers
    else:
        raise ConfigError(f"overrides.checkpointedLayers: {overrides.checkpointed_layers}, but the model has {layers} layers")
    return RunPlan(
        device=dist.device.type,
        world_size=dist.world_size,
        precision="bf16" if training_dtype(dist.device) == torch.bfloat16 else "fp32",
        attention=built.attention,
        compile=built.compile,
        fused_loss=built.fused_loss,
        checkpointed_layers=checkpointed,
        layers=layers,
        zero_stage=config.distributed.zero_stage,
        offload=config.distributed.offload,
        micro_batch_size=config.training.micro_batch_size,
        global_batch_size=steps.global_batch_size,
        epochs=steps.epochs,
        accumulation_steps=steps.accumulation_steps,
        total_steps=steps.total_steps,
        deepspeed=merged(engines.deepspeed_config(config, steps, dist.device), overrides.deepspeed or {}),
    )


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """base with changes applied key by key, into nested dicts; a None value removes the key."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _given(override: bool | None, decide) -> bool:
    return decide() if override is None else override
