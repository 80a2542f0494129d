"""How a training run executes, decided once before the first step (torch-free).

The trainer decides each runtime choice (attention kernel, torch.compile, fused loss, how many
layers recompute their activations, the DeepSpeed config, gradient accumulation) in one place,
freezes the answers in a `RunPlan`, logs it, writes it to result.json, and the operator shows it on
the published Model. A benchmark asks for a different choice through `RunPlanOverrides`, never by
patching the trainer's functions. The decisions themselves are made in `planning.py`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from finetune_trainer.config import ContractModel


class RunPlan(ContractModel):
    """The runtime choices a training run made, fixed before its first step."""

    device: Literal["cuda", "cpu"] = Field(description="Device type the processes trained on.")
    world_size: int = Field(ge=1, description="Trainer processes across all nodes.")
    precision: Literal["bf16", "fp32"] = Field(description="Dtype of the weights and activations.")
    attention: str = Field(max_length=64, description="Attention implementation (for example sdpa or a packed varlen kernel).")
    compile: bool = Field(description="Whether each decoder layer ran under torch.compile.")
    fused_loss: bool = Field(description="Whether the LM head and cross-entropy ran as one fused kernel.")
    checkpointed_layers: int = Field(ge=0, description="Decoder layers that recompute their activations in the backward pass.")
    layers: int = Field(ge=0, description="Decoder layers in the model.")
    zero_stage: int = Field(ge=0, le=3, description="DeepSpeed ZeRO stage.")
    offload: Literal["none", "optimizer", "parameters"] = Field(description="What DeepSpeed kept in CPU memory.")
    micro_batch_size: int = Field(ge=1, description="Rows per forward pass per process.")
    # Optional: a trainer image older than the operator does not report it (its result must still parse).
    global_batch_size: int | None = Field(
        default=None, ge=1, description="Rows per optimizer step, all processes (chosen here when the spec said auto).")
    epochs: int | None = Field(
        default=None, ge=1, description="Passes over the training split (chosen here when the spec said auto).")
    accumulation_steps: int = Field(ge=1, description="Micro-batches per process per optimizer step.")
    total_steps: int = Field(ge=0, description="Optimizer steps planned.")
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="The DeepSpeed config the engine was built with.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class RunPlanOverrides(ContractModel):
    """Choices a caller (the benchmark, a test) makes instead of the trainer; unset means the
    trainer decides. An override is taken as given, even where the trainer would refuse it
    (the fused loss on a CPU fails when the model runs): it is for measuring, not for jobs."""

    attention: str | None = Field(
        default=None, max_length=64,
        description="attn_implementation to load the model with (sdpa, eager, flash_attention_2, finetune_varlen).",
    )
    compile: bool | None = Field(default=None, description="Compile every decoder layer, or none.")
    fused_loss: bool | None = Field(default=None, description="Fuse the LM head with the cross-entropy (Liger), or not.")
    checkpointed_layers: int | None = Field(
        default=None, ge=0, description="Decoder layers that recompute their activations; at most the model's layer count."
    )
    deepspeed: dict[str, Any] | None = Field(
        default=None,
        description="Merged into the planned DeepSpeed config, key by key into nested objects; a null value removes the key.",
    )
