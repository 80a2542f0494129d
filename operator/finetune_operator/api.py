"""The finetune.ai/v1alpha1 API: FineTuneJob and Model.

The training sections (dataset options, method, training, distributed, checkpointing) and the
Model's spec are the trainer's contract types (`finetune_trainer.config`,
`finetune_trainer.model_manifest`), written once there; this module composes them and adds only
the Kubernetes parts: URIs and credentials, resources, node pools, lifecycle, status, and the
CEL rules that span sections. `crdgen` turns these models into the CRD YAML in `crds/` and in
the Helm chart, so defaults, enums, bounds, descriptions and rules are what `kubectl apply`
enforces. The operator parses every object it handles through the same models. This module
imports neither Kopf nor torch.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from finetune_trainer.config import (
    PRESET_NAMES,
    BaseModelOptions,
    CheckpointingOptions,
    ContractModel,
    DatasetOptions,
    DistributedConfig,
    MethodConfig,
    Rule,
    TrainingConfig,
    immutable,
)
# The group and version are the Model manifest's too (the trainer writes model.yaml); re-exported here.
from finetune_trainer.model_manifest import API_VERSION, ModelMetrics, ModelSpec
from finetune_trainer.model_manifest import GROUP as GROUP
from finetune_trainer.model_manifest import VERSION as VERSION
from pydantic import ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel


# Longest FineTuneJob name: children are named "<job>-trainer" etc. and Job names end up in
# pod labels (63 characters), so leave room for the suffixes the operator adds.
MAX_JOB_NAME_LENGTH = 50

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
MODEL_SOURCE = r"^(hf|pvc|s3|oci|preset)://[^\s]+$"
DATASET_SOURCE = r"^(pvc|https|s3|configmap|hf)://[^\s]+$"
OUTPUT_DESTINATION = r"^(pvc|s3|oci)://[^\s]+$"


NO_PARENT_SEGMENTS = {"x-kubernetes-validations": [Rule("!self.matches('(^|/)[.][.](/|$)')", "must not contain '..' path segments").to_cel()]}


class ApiModel(ContractModel):
    """Base for API types: the contract's conventions (camelCase, unknown fields rejected, CEL
    rules with their Python twins), but mutable: the operator updates what it parses."""

    model_config = ConfigDict(frozen=False)


class StatusModel(ApiModel):
    # Status is written by the operator; tolerate fields a newer operator may have added.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


SecretName = Annotated[str, Field(max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")]


# --- spec ------------------------------------------------------------------------------------


class BaseModelSpec(BaseModelOptions, ApiModel):
    """The model to fine-tune."""

    source: str = Field(
        max_length=1024,
        pattern=MODEL_SOURCE, json_schema_extra=NO_PARENT_SEGMENTS,
        description="Where the base model comes from: hf://ORG/NAME (Hugging Face hub), pvc://CLAIM/PATH "
        "(a directory on a PersistentVolumeClaim), s3://BUCKET/PREFIX, oci://REGISTRY/REPO:TAG, or "
        f"preset://NAME for the built-in random-init configs ({', '.join(PRESET_NAMES)}).",
    )
    credentials_secret: SecretName | None = Field(
        default=None,
        description="Name of a Secret in the job's namespace holding the credentials for the source "
        "(key `token` for hf://, AWS keys for s3://, `.dockerconfigjson` for oci://).",
    )


class DatasetSpec(DatasetOptions, ApiModel):
    """The training data: JSON lines in chat, prompt-completion or text format."""

    source: str = Field(
        max_length=1024,
        pattern=DATASET_SOURCE, json_schema_extra=NO_PARENT_SEGMENTS,
        description="Where the JSONL data comes from: pvc://CLAIM/PATH, https://URL, s3://BUCKET/KEY, "
        "configmap://NAME/KEY, or hf://ORG/NAME.",
    )
    credentials_secret: SecretName | None = Field(
        default=None, description="Name of a Secret in the job's namespace with credentials for the source."
    )


class DistributedSpec(DistributedConfig, ApiModel):
    """Parallelism: DeepSpeed ZeRO across processes and nodes."""

    nodes: int = Field(default=1, ge=1, le=256, description="Number of nodes, one trainer pod per node.")


class ResourcesSpec(ApiModel):
    """What each trainer pod needs."""

    accelerator: str = Field(
        default="nvidia.com/gpu",
        max_length=253,
        pattern=r"^(none|[a-z0-9.-]+/[a-z0-9.-]+)$",
        description="Extended resource name of the accelerator (nvidia.com/gpu), or none for a CPU pool.",
    )
    accelerators_per_node: int = Field(
        default=1, ge=0, le=64, description="Accelerators per pod; also the number of trainer processes per node."
    )
    instance_type: str | None = Field(
        default=None,
        max_length=128,
        description="Cloud instance type to provision (node.kubernetes.io/instance-type); any type that fits when unset.",
    )
    cpu: str = Field(default="8", max_length=32, pattern=QUANTITY, description="CPU request per pod (a quantity).")
    memory: str = Field(default="64Gi", max_length=32, pattern=QUANTITY, description="Memory request per pod (a quantity).")


class NodeClassRef(ApiModel):
    """Reference to a Karpenter node class."""

    group: str = Field(max_length=253, description="API group of the node class, for example karpenter.k8s.aws.")
    kind: str = Field(max_length=63, description="Kind of the node class, for example EC2NodeClass.")
    name: str = Field(max_length=253, description="Name of the node class.")


class Toleration(ApiModel):
    """A pod toleration, as in the core API."""

    key: str | None = Field(default=None, max_length=316, description="Taint key the toleration applies to.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal (default Equal).")
    value: str | None = Field(default=None, max_length=63, description="Taint value to match with Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; all effects when empty."
    )
    toleration_seconds: int | None = Field(
        default=None, description="How long a NoExecute taint is tolerated before eviction."
    )


class NodePoolSpec(ApiModel):
    """Where trainer pods run and who provides the nodes."""

    provisioner: Literal["karpenter", "existing", "none"] | None = Field(
        default=None,
        description="karpenter: create a node pool for the job and delete it when done; existing: use "
        "existing nodes picked by nodeSelector and tolerations; none: plain resource requests. The "
        "operator's default applies when unset.",
    )
    node_class_ref: NodeClassRef | None = Field(
        default=None, description="Karpenter node class for the pool; the operator's default applies when unset."
    )
    capacity_type: Literal["on-demand", "spot"] = Field(
        default="on-demand", description="Karpenter capacity type for provisioned nodes."
    )
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        default=None, max_length=32, description="Node labels the trainer pods require (existing mode)."
    )
    tolerations: list[Toleration] | None = Field(
        default=None, max_length=32, description="Tolerations added to the trainer pods (existing mode)."
    )


class OutputSpec(ApiModel):
    """Where the fine-tuned weights are written and under which Model name they are published."""

    destination: str = Field(
        max_length=1024,
        pattern=OUTPUT_DESTINATION, json_schema_extra=NO_PARENT_SEGMENTS,
        description="Where the adapter (or full weights) go: pvc://CLAIM/PATH, s3://BUCKET/PREFIX or "
        "oci://REGISTRY/REPO:TAG.",
    )
    credentials_secret: SecretName | None = Field(
        default=None, description="Name of a Secret in the job's namespace with credentials for the destination."
    )
    model_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Name of the Model resource to publish; defaults to the job's name.",
    )


class CheckpointingSpec(CheckpointingOptions, ApiModel):
    """Periodic checkpoints on the output volume, used to resume after any restart."""


_PROCESSES = "(self.resources.accelerator == 'none' ? 1 : self.resources.acceleratorsPerNode)"

# Rules across sections; each section's own rules live on its contract type.
SPEC_RULES = (
    Rule(
        "self.method.type != 'qlora' || self.resources.accelerator != 'none'",
        "method.type qlora needs a GPU: set resources.accelerator (for example nvidia.com/gpu), or use lora on CPU",
        ".method.type",
        lambda s: s.method.type != "qlora" or s.resources.accelerator != "none",
    ),
    Rule(
        "self.resources.accelerator == 'none' || self.resources.acceleratorsPerNode >= 1",
        "resources.acceleratorsPerNode must be at least 1 when an accelerator is requested",
        ".resources.acceleratorsPerNode",
        lambda s: s.resources.accelerator == "none" or s.resources.accelerators_per_node >= 1,
    ),
    Rule(
        f"self.training.globalBatchSize % (self.training.microBatchSize * self.distributed.nodes * {_PROCESSES}) == 0",
        "training.globalBatchSize must be a multiple of training.microBatchSize x distributed.nodes x "
        "processes per node (resources.acceleratorsPerNode, or 1 on CPU)",
        ".training.globalBatchSize",
        lambda s: s.training.global_batch_size % (s.training.micro_batch_size * s.distributed.nodes * s.processes_per_node) == 0,
    ),
    Rule(
        "!has(self.nodePool.nodeClassRef) || !has(self.nodePool.provisioner) || self.nodePool.provisioner == 'karpenter'",
        "nodePool.nodeClassRef only applies to the karpenter provisioner",
        ".nodePool.nodeClassRef",
        lambda s: s.node_pool.node_class_ref is None or s.node_pool.provisioner in (None, "karpenter"),
    ),
    Rule(
        "!has(self.nodePool.provisioner) || self.nodePool.provisioner != 'karpenter' || "
        "(!has(self.nodePool.nodeSelector) && !has(self.nodePool.tolerations))",
        "nodePool.nodeSelector and nodePool.tolerations apply to the existing and none provisioners; "
        "karpenter pools get their own taint and selector",
        ".nodePool.provisioner",
        lambda s: s.node_pool.provisioner != "karpenter" or (s.node_pool.node_selector is None and s.node_pool.tolerations is None),
    ),
)


class FineTuneJobSpec(ApiModel):
    """Desired state of a FineTuneJob.

    Everything but the lifecycle fields (suspend, activeDeadlineSeconds, ttlSecondsAfterFinished,
    backoffLimit) is immutable after creation: a running trainer cannot change its model, data or
    hyperparameters, so the API server rejects such edits instead of the operator ignoring them.
    """

    RULES = SPEC_RULES

    base_model: BaseModelSpec = Field(description="The model to fine-tune.", json_schema_extra=immutable("baseModel"))
    dataset: DatasetSpec = Field(description="The training data.", json_schema_extra=immutable("dataset"))
    method: MethodConfig = Field(
        default_factory=MethodConfig, description="The fine-tuning method.", json_schema_extra=immutable("method")
    )
    training: TrainingConfig = Field(
        default_factory=TrainingConfig, description="Optimisation hyperparameters.", json_schema_extra=immutable("training")
    )
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec,
        description="DeepSpeed ZeRO and multi-node settings.",
        json_schema_extra=immutable("distributed"),
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="Per-pod resources.", json_schema_extra=immutable("resources")
    )
    node_pool: NodePoolSpec = Field(
        default_factory=NodePoolSpec, description="Node provisioning.", json_schema_extra=immutable("nodePool")
    )
    output: OutputSpec = Field(description="Where the result goes.", json_schema_extra=immutable("output"))
    checkpointing: CheckpointingSpec = Field(
        default_factory=CheckpointingSpec,
        description="Checkpoint cadence and retention.",
        json_schema_extra=immutable("checkpointing"),
    )
    suspend: bool = Field(
        default=False, description="Stop the trainer after a checkpoint and release its nodes; false resumes it."
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Fail the job with reason DeadlineExceeded after this many seconds of running."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the FineTuneJob this many seconds after it succeeds or fails."
    )
    backoff_limit: int = Field(
        default=3, ge=0, le=100, description="Retries of retryable trainer failures before the job fails. On several nodes one "
        "failed pod restarts the whole attempt, which resumes from the latest checkpoint."
    )

    @property
    def processes_per_node(self) -> int:
        return 1 if self.resources.accelerator == "none" else self.resources.accelerators_per_node


# --- status ----------------------------------------------------------------------------------

Phase = Literal["Pending", "Provisioning", "Running", "Succeeded", "Failed", "Suspended"]
TERMINAL_PHASES = ("Succeeded", "Failed")


class Condition(StatusModel):
    """A condition as the Kubernetes API conventions describe it."""

    type: str = Field(max_length=316, description="Condition type: Ready, Provisioned, Running, Succeeded or Failed.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(max_length=1024, description="Machine-readable reason in CamelCase.")
    message: str = Field(default="", max_length=32768, description="Human-readable details.")
    last_transition_time: datetime = Field(description="When the status last changed.")
    observed_generation: int | None = Field(default=None, description="The spec generation this condition describes.")


class Progress(StatusModel):
    """Training progress as the trainer reports it."""

    step: int | None = Field(default=None, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Optimizer steps planned.")
    percent: int | None = Field(default=None, ge=0, le=100, description="Share of steps done, 0 to 100.")
    loss: float | None = Field(default=None, description="Latest training loss.")
    tokens_per_second: float | None = Field(default=None, description="Recent throughput across all processes.")
    eta: str | None = Field(default=None, description="Estimated time left, for example 12m30s.")
    updated_at: datetime | None = Field(default=None, description="When the trainer last reported.")


class FineTuneJobStatus(StatusModel):
    """Observed state of a FineTuneJob, written by the operator."""

    phase: Phase | None = Field(default=None, description="Pending, Provisioning, Running, Succeeded, Failed or Suspended.")
    conditions: list[Condition] = Field(default_factory=list, description="Current conditions.")
    progress: Progress | None = Field(default=None, description="Live training progress.")
    model: str | None = Field(default=None, description="Name of the published Model.")
    trainer_job: str | None = Field(default=None, description="Name of the trainer batch/v1 Job.")
    start_time: datetime | None = Field(default=None, description="When the trainer was first started.")
    completion_time: datetime | None = Field(default=None, description="When the job succeeded or failed.")
    observed_generation: int | None = Field(default=None, description="The spec generation last acted on.")


class ObjectMeta(StatusModel):
    """The part of metadata the operator reads."""

    name: str
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class FineTuneJob(StatusModel):
    """A request to fine-tune a model; publishes a Model when it succeeds."""

    api_version: str = API_VERSION
    kind: str = "FineTuneJob"
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus = Field(default_factory=FineTuneJobStatus)

    @property
    def model_name(self) -> str:
        return self.spec.output.model_name or self.metadata.name


def api_errors(error: ValidationError) -> str:
    """A FineTuneJob the operator cannot read, in the API server's manner: `spec.a.b: what`."""
    parts = []
    for item in error.errors():
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in item["loc"]).lstrip(".")
        parts.append(f"{where}: {item['msg'].removeprefix('Value error, ')}" if where else item["msg"])
    return "; ".join(parts)


# --- Model -----------------------------------------------------------------------------------


class ModelStatus(StatusModel):
    """Observed state of a Model."""

    phase: Literal["Pending", "Ready", "Failed"] | None = Field(default=None, description="Pending, Ready or Failed.")
    conditions: list[Condition] = Field(default_factory=list, description="Current conditions.")
    metrics: ModelMetrics | None = Field(default=None, description="Final training metrics.")


class Model(StatusModel):
    """A fine-tuned model published by a FineTuneJob."""

    api_version: str = API_VERSION
    kind: str = "Model"
    metadata: ObjectMeta
    spec: ModelSpec
    status: ModelStatus = Field(default_factory=ModelStatus)
