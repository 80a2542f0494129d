"""The finetune.ai/v1alpha1 API: FineTuneJob and Model, defined once.

These pydantic models are the single source of truth. `crdgen` turns them into the CRD YAML in
`crds/` and in the Helm chart, so defaults, enums, bounds, descriptions and the cross-field
CEL rules below are what `kubectl apply` enforces. The operator parses every object it
handles through the same models. This module imports neither Kopf nor torch.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "finetune.ai"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Longest FineTuneJob name: children are named "<job>-trainer" etc. and Job names end up in
# pod labels (63 characters), so leave room for the suffixes the operator adds.
MAX_JOB_NAME_LENGTH = 50

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
SHA256_HEX = r"^[a-f0-9]{64}$"
QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
MODEL_SOURCE = r"^(hf|pvc|s3|oci|preset)://[^\s]+$"
DATASET_SOURCE = r"^(pvc|https|s3|configmap|hf)://[^\s]+$"
OUTPUT_DESTINATION = r"^(pvc|s3|oci)://[^\s]+$"


def cel(rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> dict[str, str]:
    """One x-kubernetes-validations entry."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


NO_PARENT_SEGMENTS = {
    "x-kubernetes-validations": [cel("!self.matches('(^|/)[.][.](/|$)')", "must not contain '..' path segments")]
}


def immutable(what: str) -> dict[str, Any]:
    """A transition rule that rejects any change once the object exists."""
    return {"x-kubernetes-validations": [cel("self == oldSelf", f"{what} is immutable once the job is created; create a new FineTuneJob instead")]}


class ApiModel(BaseModel):
    """Base for API types: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class StatusModel(ApiModel):
    # Status is written by the operator; tolerate fields a newer operator may have added.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


SecretName = Annotated[str, Field(max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")]


# --- spec ------------------------------------------------------------------------------------


class BaseModelSpec(ApiModel):
    """The model to fine-tune."""

    source: str = Field(
        max_length=1024,
        pattern=MODEL_SOURCE, json_schema_extra=NO_PARENT_SEGMENTS,
        description="Where the base model comes from: hf://ORG/NAME (Hugging Face hub), pvc://CLAIM/PATH "
        "(a directory on a PersistentVolumeClaim), s3://BUCKET/PREFIX, oci://REGISTRY/REPO:TAG, or "
        "preset://NAME for the built-in random-init configs (tiny-llama, llama-1b, llama-3b, llama-8b).",
    )
    revision: str | None = Field(
        default=None, max_length=256, description="Hub revision (branch, tag or commit) for hf:// sources."
    )
    credentials_secret: SecretName | None = Field(
        default=None,
        description="Name of a Secret in the job's namespace holding the credentials for the source "
        "(key `token` for hf://, AWS keys for s3://, `.dockerconfigjson` for oci://).",
    )


class DatasetSpec(ApiModel):
    """The training data: JSON lines in chat, prompt-completion or text format."""

    source: str = Field(
        max_length=1024,
        pattern=DATASET_SOURCE, json_schema_extra=NO_PARENT_SEGMENTS,
        description="Where the JSONL data comes from: pvc://CLAIM/PATH, https://URL, s3://BUCKET/KEY, "
        "configmap://NAME/KEY, or hf://ORG/NAME.",
    )
    sha256: str | None = Field(
        default=None,
        pattern=SHA256_HEX,
        description="Expected SHA-256 of the data file (64 lowercase hex digits); the trainer fails if it differs.",
    )
    credentials_secret: SecretName | None = Field(
        default=None, description="Name of a Secret in the job's namespace with credentials for the source."
    )
    format: Literal["auto", "chat", "prompt-completion", "text"] = Field(
        default="auto",
        description="Record format: chat (`messages`), prompt-completion (`prompt`/`completion`), text "
        "(`text`), or auto to detect it from the first record.",
    )
    validation_split: float = Field(
        default=0.05, ge=0.0, le=0.5, description="Fraction of records held out to compute the eval loss."
    )
    skip_bad_lines: bool = Field(
        default=False,
        description="Skip malformed lines (and report how many) instead of failing on the first one.",
    )


class LoraSpec(ApiModel):
    """Adapter hyperparameters for lora, qlora and dora."""

    r: int = Field(default=16, ge=1, le=1024, description="Adapter rank.")
    alpha: float = Field(default=32, gt=0, le=4096, description="Scaling numerator: updates are scaled by alpha/r.")
    dropout: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on the adapter input. Off by default: it costs step time and memory (bench/README.md).",
    )
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default=["all-linear"],
        min_length=1,
        max_length=64,
        description="Module names to adapt (for example q_proj, v_proj), or all-linear for every linear "
        "layer except the output head.",
    )


class MethodSpec(ApiModel):
    """How the model is fine-tuned."""

    type: Literal["lora", "qlora", "dora", "full"] = Field(
        default="lora",
        description="lora: low-rank adapters; qlora: LoRA on a 4-bit NF4 base (GPU only); dora: "
        "weight-decomposed LoRA; full: every weight is trained.",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Adapter settings; ignored for full fine-tuning.")


class TrainingSpec(ApiModel):
    """Optimisation hyperparameters."""

    epochs: int = Field(default=3, ge=1, le=1000, description="Passes over the training split.")
    max_steps: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Stop after this many optimizer steps, whatever the epochs."
    )
    learning_rate: float = Field(default=2e-4, gt=0, le=1, description="Peak learning rate.")
    micro_batch_size: int = Field(default=4, ge=1, le=4096, description="Sequences per process per forward pass.")
    global_batch_size: int = Field(
        default=32,
        ge=1,
        le=1_048_576,
        description="Sequences per optimizer step across all processes; must be a multiple of microBatchSize "
        "times the number of processes (nodes x acceleratorsPerNode).",
    )
    max_seq_length: int = Field(default=2048, ge=16, le=1_048_576, description="Longest sequence in tokens.")
    packing: bool = Field(default=True, description="Pack several records into each sequence (padding-free).")
    gradient_checkpointing: bool | None = Field(
        default=None,
        description="Recompute activations in the backward pass to save memory. true: every layer; false: "
        "none; unset: only as many layers as the GPU's memory needs, measured when training starts (none "
        "on CPU; every layer with ZeRO-3 or offload).",
    )
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Seed for initialisation, data order and split.")
    compile: bool | None = Field(
        default=None,
        description="torch.compile each decoder layer. Unset: on for GPU jobs with lora, qlora or full at "
        "zeroStage 0-2 (where the benchmark shows it pays), off otherwise; false opts out.",
    )


class DistributedSpec(ApiModel):
    """Parallelism: DeepSpeed ZeRO across processes and nodes."""

    zero_stage: int = Field(default=2, ge=0, le=3, description="DeepSpeed ZeRO stage (0 to 3).")
    offload: Literal["none", "optimizer", "parameters"] = Field(
        default="none",
        description="Offload to CPU memory: optimizer state (ZeRO 1-3) or also parameters (ZeRO 3 only).",
    )
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


class CheckpointingSpec(ApiModel):
    """Periodic checkpoints on the output volume, used to resume after any restart."""

    every_steps: int = Field(default=200, ge=1, le=10_000_000, description="Save a checkpoint every N optimizer steps.")
    keep: int = Field(default=2, ge=1, le=100, description="How many recent checkpoints to keep.")


_PROCESSES = "(self.resources.accelerator == 'none' ? 1 : self.resources.acceleratorsPerNode)"

SPEC_RULES = [
    cel(
        "self.method.type != 'qlora' || self.resources.accelerator != 'none'",
        "method.type qlora needs a GPU: set resources.accelerator (for example nvidia.com/gpu), or use lora on CPU",
        ".method.type",
    ),
    cel(
        "self.distributed.offload != 'parameters' || self.distributed.zeroStage == 3",
        "distributed.offload parameters needs distributed.zeroStage 3",
        ".distributed.offload",
    ),
    cel(
        "self.distributed.offload != 'optimizer' || self.distributed.zeroStage >= 1",
        "distributed.offload optimizer needs distributed.zeroStage 1, 2 or 3",
        ".distributed.offload",
    ),
    cel(
        "self.resources.accelerator == 'none' || self.resources.acceleratorsPerNode >= 1",
        "resources.acceleratorsPerNode must be at least 1 when an accelerator is requested",
        ".resources.acceleratorsPerNode",
    ),
    cel(
        f"self.training.globalBatchSize % (self.training.microBatchSize * self.distributed.nodes * {_PROCESSES}) == 0",
        "training.globalBatchSize must be a multiple of training.microBatchSize x distributed.nodes x "
        "processes per node (resources.acceleratorsPerNode, or 1 on CPU)",
        ".training.globalBatchSize",
    ),
    cel(
        "!has(self.nodePool.nodeClassRef) || !has(self.nodePool.provisioner) || self.nodePool.provisioner == 'karpenter'",
        "nodePool.nodeClassRef only applies to the karpenter provisioner",
        ".nodePool.nodeClassRef",
    ),
    cel(
        "!has(self.nodePool.provisioner) || self.nodePool.provisioner != 'karpenter' || "
        "(!has(self.nodePool.nodeSelector) && !has(self.nodePool.tolerations))",
        "nodePool.nodeSelector and nodePool.tolerations apply to the existing and none provisioners; "
        "karpenter pools get their own taint and selector",
        ".nodePool.provisioner",
    ),
]


class FineTuneJobSpec(ApiModel):
    """Desired state of a FineTuneJob.

    Everything but the lifecycle fields (suspend, activeDeadlineSeconds, ttlSecondsAfterFinished,
    backoffLimit) is immutable after creation: a running trainer cannot change its model, data or
    hyperparameters, so the API server rejects such edits instead of the operator ignoring them.
    """

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": SPEC_RULES})

    base_model: BaseModelSpec = Field(description="The model to fine-tune.", json_schema_extra=immutable("baseModel"))
    dataset: DatasetSpec = Field(description="The training data.", json_schema_extra=immutable("dataset"))
    method: MethodSpec = Field(
        default_factory=MethodSpec, description="The fine-tuning method.", json_schema_extra=immutable("method")
    )
    training: TrainingSpec = Field(
        default_factory=TrainingSpec, description="Optimisation hyperparameters.", json_schema_extra=immutable("training")
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


# --- Model -----------------------------------------------------------------------------------


class FileDigest(ApiModel):
    """Digest of one output file."""

    sha256: str = Field(pattern=SHA256_HEX, description="SHA-256 of the file.")
    size: int = Field(ge=0, description="Size in bytes.")


class AdapterSpec(ApiModel):
    """The published weights."""

    uri: str = Field(max_length=1024, description="Where the files are (the job's output destination).")
    format: Literal["peft", "full"] = Field(description="peft: a PEFT adapter; full: complete model weights.")
    sha256: str = Field(
        pattern=SHA256_HEX, description="SHA-256 of the weights file (adapter_model.safetensors or model.safetensors)."
    )
    size_bytes: int = Field(ge=0, description="Total size of all published files in bytes.")
    files: dict[str, FileDigest] = Field(
        default_factory=dict, description="Every published file with its digest, as the trainer reported it."
    )


class ModelBaseRef(ApiModel):
    """The base model the weights apply to."""

    source: str = Field(max_length=1024, description="Source of the base model, as in the FineTuneJob.")
    revision: str | None = Field(default=None, max_length=256, description="Hub revision, when given.")


class DatasetRef(ApiModel):
    """The data the model was trained on."""

    source: str = Field(max_length=1024, description="Source of the dataset, as in the FineTuneJob.")
    sha256: str | None = Field(default=None, pattern=SHA256_HEX, description="SHA-256 of the data, when known.")


class SourceJobRef(ApiModel):
    """The FineTuneJob that produced this Model."""

    name: str = Field(max_length=253, description="Name of the FineTuneJob.")
    uid: str = Field(max_length=64, description="UID of the FineTuneJob.")


class ModelSpec(ApiModel):
    """A fine-tuned model: published weights and their lineage. Written once, by the operator."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [cel("self == oldSelf", "Model spec is immutable")]})

    base_model: ModelBaseRef = Field(description="The base model the weights apply to.")
    adapter: AdapterSpec = Field(description="The published weights.")
    method: MethodSpec = Field(description="The method as trained.")
    training: TrainingSpec = Field(description="The hyperparameters as trained.")
    dataset: DatasetRef = Field(description="The data as trained.")
    source_job: SourceJobRef = Field(description="The job that produced the weights.")


class ModelMetrics(StatusModel):
    """Final metrics reported by the trainer."""

    train_loss: float | None = Field(default=None, description="Training loss at the end.")
    eval_loss: float | None = Field(default=None, description="Validation loss at the end.")
    initial_eval_loss: float | None = Field(default=None, description="Validation loss before training.")
    steps: int | None = Field(default=None, description="Optimizer steps run.")
    tokens_seen: int | None = Field(default=None, description="Training tokens processed.")


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
