"""The Model a training run is published as, rendered by one function (torch-free).

`render_model` turns the operator's `PublishConfig`, the method and hyperparameters as trained,
and the trainer's result into a Model manifest. The trainer calls it to write model.yaml next to
the weights (so an output directory describes itself even where no operator reads it), and the
operator calls it to publish the Model resource from the termination message, so the two cannot
disagree. The operator adds only the Kubernetes parts (labels, ownerReferences, conditions).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from finetune_trainer.config import (
    ContractModel,
    DatasetRef,
    MethodConfig,
    ModelBaseRef,
    PublishConfig,
    Rule,
    SHA256_HEX,
    SourceJobRef,
    TrainingConfig,
)
from finetune_trainer.result import WEIGHT_FILES, FileDigest, TrainerResult, World
from finetune_trainer.run_plan import RunPlan

GROUP = "finetune.ai"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


class AdapterSpec(ContractModel):
    """The published weights."""

    uri: str = Field(max_length=1024, description="Where the files are (the job's output destination).")
    format: Literal["peft", "full"] = Field(description="peft: a PEFT adapter; full: complete model weights.")
    sha256: str = Field(pattern=SHA256_HEX, description=f"SHA-256 of the weights file ({', '.join(WEIGHT_FILES)}).")
    size_bytes: int = Field(ge=0, description="Total size of the published files (all but model.yaml) in bytes.")
    files: dict[str, FileDigest] = Field(
        default_factory=dict,
        description="Every published file but model.yaml with its digest, as the trainer reported it (only the "
        "weights file when the trainer's report was too long for its termination message).",
    )


class ModelSpec(ContractModel):
    """A fine-tuned model: published weights and their lineage. Written once, by the operator."""

    RULES = (Rule("self == oldSelf", "Model spec is immutable"),)

    base_model: ModelBaseRef = Field(description="The base model the weights apply to.")
    adapter: AdapterSpec = Field(description="The published weights.")
    method: MethodConfig = Field(description="The method as trained.")
    training: TrainingConfig = Field(description="The hyperparameters as trained.")
    dataset: DatasetRef = Field(description="The data as trained.")
    source_job: SourceJobRef = Field(description="The job that produced the weights.")
    world: World | None = Field(
        default=None, description="The process group the trainer joined, as it measured it (checked by the operator "
        "against the job's distributed.nodes x processes per node before the Model was published).",
    )
    run_plan: RunPlan | None = Field(default=None, description="How the trainer ran: kernels, memory plan, DeepSpeed config.")


class ModelMetrics(ContractModel):
    """Final metrics reported by the trainer."""

    train_loss: float | None = Field(default=None, description="Training loss per target token over the last steps.")
    eval_loss: float | None = Field(default=None, description="Validation loss per target token at the end.")
    initial_eval_loss: float | None = Field(default=None, description="Validation loss before training.")
    steps: int | None = Field(default=None, description="Optimizer steps run.")
    tokens_seen: int | None = Field(default=None, description="Training tokens processed.")


def model_spec(publish: PublishConfig, method: MethodConfig, training: TrainingConfig, result: TrainerResult) -> ModelSpec:
    return ModelSpec(
        base_model=publish.base_model,
        adapter=AdapterSpec(
            uri=publish.uri,
            format=result.format,
            sha256=result.files[result.weights_file].sha256,
            size_bytes=result.model_size,
            files=result.model_files(),
        ),
        method=method,
        training=training,
        dataset=publish.dataset,
        source_job=publish.source_job,
        world=result.world,
        run_plan=result.run_plan,
    )


def model_metrics(result: TrainerResult) -> ModelMetrics:
    m = result.metrics
    return ModelMetrics(train_loss=m.train_loss, eval_loss=m.eval_loss, initial_eval_loss=m.initial_eval_loss,
                        steps=m.steps, tokens_seen=m.tokens)


def render_model(publish: PublishConfig, method: MethodConfig, training: TrainingConfig,
                 result: TrainerResult) -> dict[str, Any]:
    """The Model manifest (camelCase): identity, spec, and status.metrics."""
    metadata = {"name": publish.name}
    if publish.namespace:
        metadata["namespace"] = publish.namespace
    return {
        "apiVersion": API_VERSION,
        "kind": "Model",
        "metadata": metadata,
        "spec": model_spec(publish, method, training, result).to_wire(),
        "status": {"metrics": model_metrics(result).to_wire()},
    }
