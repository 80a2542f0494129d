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

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

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
from pydantic import AfterValidator, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from . import sources


# Longest FineTuneJob name: children are named "<job>-trainer" etc. and Job names end up in
# pod labels (63 characters), so leave room for the suffixes the operator adds.
MAX_JOB_NAME_LENGTH = 50

# One regex dialect. The API server reads `pattern` and CEL `matches()` with Go's RE2, pydantic
# with Rust's regex crate and the Python twins below with `re`; they agree only on explicit ASCII
# classes. Shorthands (\s, \w, \d, \b, \p{..}) differ: RE2's \s is ASCII whitespace, Rust's is
# Unicode (a non-breaking space in a path passed one and failed the other). No backslashes either
# (write [.] rather than \.): the same text goes into CEL string literals.
# tests/unit/test_spec_rules.py fails on any pattern that breaks this.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A label value (also a taint's value, and a node's instance type): at most 63 characters.
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_VALUE = rf"^({_LABEL_NAME})?$"
# A label key (also a taint's key): an optional DNS-subdomain prefix and '/', then a name.
LABEL_KEY = rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_LABEL_NAME}$"
MAX_LABEL_PREFIX = 253


@dataclass(frozen=True)
class Check:
    """A rule on one value, written once: `cel` for the API server (the value spelled `{v}`), and
    `holds` for the operator's parser and local runs."""

    cel: str
    message: str
    holds: Callable[[Any], bool]

    def on(self, subject: str = "self") -> str:
        return self.cel.replace("{v}", subject)

    def to_cel(self) -> dict[str, str]:
        return {"rule": self.on(), "message": self.message}


def matching(regex: str, message: str) -> Check:
    """`regex` for both validators (CEL `matches()` is RE2, `re.fullmatch` the twin)."""
    if "'" in regex or "\\" in regex:
        raise ValueError(f"{regex!r}: no quotes or backslashes (it is written into a CEL string)")
    return Check(f"{{v}}.matches('{regex}')", message, lambda v, r=re.compile(regex): r.fullmatch(v) is not None)


def each_key(check: Check, message: str) -> Check:
    """`check` on every key of a map (the API server keeps no schema for keys, only CEL on the map)."""
    return Check(f"self.all(k, {check.on('k')})", message, lambda m: all(check.holds(k) for k in m))


def checked(*checks: Check) -> tuple[Any, ...]:
    """Annotated metadata that puts `checks` into the CRD (x-kubernetes-validations on the value)
    and runs their twins when the operator parses it."""
    def validate(value):
        if value is not None:
            for check in checks:
                if not check.holds(value):
                    raise ValueError(check.message)
        return value
    return (Field(json_schema_extra={"x-kubernetes-validations": [c.to_cel() for c in checks]}), AfterValidator(validate))


def _strings(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


# --- Kubernetes quantities: cpu and memory ------------------------------------------------------

# The grammar of k8s.io/apimachinery's ParseQuantity, which CEL's isQuantity() applies: a signed
# decimal (digits, digits., digits.digits or .digits; all optional) and one suffix: a binary SI
# (Ki..Ei), a decimal SI (n, u, m, "", k, M, G, T, P, E) or an exponent (e or E, signed int64).
_QUANTITY = re.compile(r"([+-]?)([0-9]+([.][0-9]*)?|[.][0-9]*)?(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE]([+-]?[0-9]+))?")


def _positive_quantity(text: str) -> bool:
    m = _QUANTITY.fullmatch(text)
    if not text or m is None:
        return False
    if m.group(5) is not None and not -(2**63) <= int(m.group(5)) < 2**63:
        return False
    return m.group(1) != "-" and any(c in "123456789" for c in m.group(2) or "")


POSITIVE_QUANTITY = Check(
    "isQuantity({v}) && quantity({v}).isGreaterThan(quantity('0'))",
    "must be a positive quantity, for example 8, 1500m, 512Mi or 64Gi (Ki, Mi, Gi: powers of 1024; "
    "k, M, G: powers of 1000; m: thousandths; suffixes are case-sensitive)",
    _positive_quantity,
)
Quantity = Annotated[str, Field(max_length=32), *checked(POSITIVE_QUANTITY)]


# --- node labels, taints and the keys a job may not use -----------------------------------------

# Keys of the operator's own node pools and of other tenants' dedicated nodes: its Karpenter pools
# are labelled finetune.ai/job-uid and karpenter.sh/nodepool, tainted finetune.ai/job=<uid>
# (provisioning.py); control-plane nodes carry node-role.kubernetes.io/*. A job that could
# select or tolerate these could land on another job's nodes.
RESERVED_KEY_PREFIXES = ("finetune.ai/", "node-role.kubernetes.io/")
RESERVED_KEYS = ("karpenter.sh/nodepool",)
# The one finetune.ai/ key meant for jobs: the label and taint an administrator puts on nodes set
# aside for fine-tuning (the local cluster's node, hack/node.sh; examples/quickstart.yaml). The
# operator never sets it.
USER_KEYS = ("finetune.ai/local-node",)

LABEL_KEY_CHECK = Check(
    f"{{v}}.matches('{LABEL_KEY}') && {{v}}.indexOf('/') <= {MAX_LABEL_PREFIX}",
    "must be a label key: an optional DNS-subdomain prefix (at most 253 characters) and '/', then a name "
    "of at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
    lambda v, r=re.compile(LABEL_KEY): r.fullmatch(v) is not None and v.find("/") <= MAX_LABEL_PREFIX,
)
UNRESERVED_KEY = Check(
    f"{{v}} in {_strings(USER_KEYS)} || !({{v}} in {_strings(RESERVED_KEYS)} || "
    + " || ".join(f"{{v}}.startsWith('{p}')" for p in RESERVED_KEY_PREFIXES) + ")",
    "must not be reserved for the operator's and other tenants' dedicated nodes: "
    f"{', '.join(p + '*' for p in RESERVED_KEY_PREFIXES)}, {', '.join(RESERVED_KEYS)}",
    lambda v: v in USER_KEYS or not (v in RESERVED_KEYS or v.startswith(RESERVED_KEY_PREFIXES)),
)
LABEL_VALUE_CHECK = matching(
    LABEL_VALUE,
    "must be a label value: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter "
    "or digit",
)
LabelValue = Annotated[str, Field(max_length=63), *checked(LABEL_VALUE_CHECK)]
TaintKey = Annotated[str, Field(max_length=317), *checked(LABEL_KEY_CHECK, UNRESERVED_KEY)]
def uri_of(field: str) -> Check:
    """A URI whose scheme this operator version can fetch for `field` (sources.SCHEMES): after
    `://`, printable ASCII but the space, so no whitespace of any alphabet and nothing either
    regex engine reads differently."""
    schemes = sources.SCHEMES[field]
    return matching(
        rf"^({'|'.join(schemes)})://[!-~]+$",
        f"must be a {' or '.join(s + '://' for s in schemes)} URI without spaces "
        f"({sources.NOT_YET} are not supported by this operator version yet)",
    )


# The trainer's work is not a URI path a parent segment may climb out of.
NO_PARENT_SEGMENTS = Check(
    "!{v}.matches('(^|/)[.][.](/|$)')",
    "must not contain '..' path segments",
    lambda v: re.search("(^|/)[.][.](/|$)", v) is None,
)


class ApiModel(ContractModel):
    """Base for API types: the contract's conventions (camelCase, unknown fields rejected, CEL
    rules with their Python twins), but mutable: the operator updates what it parses."""

    model_config = ConfigDict(frozen=False)


class StatusModel(ApiModel):
    # Status is written by the operator; tolerate fields a newer operator may have added.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


SecretName = Annotated[str, Field(max_length=253, pattern=DNS_SUBDOMAIN)]


# --- spec ------------------------------------------------------------------------------------


class BaseModelSpec(BaseModelOptions, ApiModel):
    """The model to fine-tune."""

    source: Annotated[str, *checked(uri_of("baseModel.source"), NO_PARENT_SEGMENTS)] = Field(
        max_length=1024,
        description="Where the base model comes from: hf://ORG/NAME (Hugging Face hub), pvc://CLAIM/PATH "
        "(a directory on a PersistentVolumeClaim), or preset://NAME for the built-in random-init configs "
        f"({', '.join(PRESET_NAMES)}). {sources.NOT_YET} sources are not supported yet.",
    )
    credentials_secret: SecretName | None = Field(
        default=None,
        description="Name of a Secret in the job's namespace holding the credentials for the source "
        "(key `token` for hf://, AWS keys for s3://, `.dockerconfigjson` for oci://).",
    )


class DatasetSpec(DatasetOptions, ApiModel):
    """The training data: JSON lines in chat, prompt-completion or text format."""

    source: Annotated[str, *checked(uri_of("dataset.source"), NO_PARENT_SEGMENTS)] = Field(
        max_length=1024,
        description="Where the JSONL data comes from: pvc://CLAIM/PATH or configmap://NAME/KEY. "
        f"{sources.NOT_YET} and hf:// datasets are not supported yet.",
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
    instance_type: Annotated[str, Field(min_length=1), *checked(LABEL_VALUE_CHECK)] | None = Field(
        default=None,
        max_length=63,
        description="Cloud instance type to provision (node.kubernetes.io/instance-type, so a label value); any type "
        "that fits when unset.",
    )
    cpu: Quantity = Field(default="8", description="CPU request per pod (a quantity: 8, 1500m).")
    memory: Quantity = Field(default="64Gi", description="Memory request and limit per pod (a quantity: 64Gi, 512Mi).")


class NodeClassRef(ApiModel):
    """Reference to a Karpenter node class."""

    group: str = Field(max_length=253, description="API group of the node class, for example karpenter.k8s.aws.")
    kind: str = Field(max_length=63, description="Kind of the node class, for example EC2NodeClass.")
    name: str = Field(max_length=253, description="Name of the node class.")


class Toleration(ApiModel):
    """A pod toleration, as in the core API, less what would let a job onto nodes that are not
    meant for it: a key is required (an empty key with Exists tolerates every taint) and may not
    be one of the reserved keys."""

    RULES = (
        Rule(
            "has(self.key) && self.key != ''",
            "a toleration needs a key: an empty key (which the API server allows only with operator Exists) "
            "tolerates every taint, other tenants' dedicated nodes included",
            ".key",
            lambda t: bool(t.key),
        ),
        Rule(
            "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
            "value must be empty when operator is Exists",
            ".value",
            lambda t: t.operator != "Exists" or not t.value,
        ),
        Rule(
            "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            "tolerationSeconds applies only to effect NoExecute",
            ".effect",
            lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
        ),
    )

    key: TaintKey | None = Field(default=None, description="Taint key the toleration applies to (required here).")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal (default Equal).")
    value: LabelValue | None = Field(default=None, description="Taint value to match with Equal; empty with Exists.")
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
    node_selector: Annotated[dict[str, LabelValue], Field(max_length=32), *checked(
        each_key(LABEL_KEY_CHECK, "keys " + LABEL_KEY_CHECK.message.replace("must be a label key", "must be label keys")),
        each_key(UNRESERVED_KEY, "keys " + UNRESERVED_KEY.message),
    )] | None = Field(
        default=None, description="Node labels the trainer pods require (existing mode). Keys reserved "
        f"for dedicated nodes ({', '.join(p + '*' for p in RESERVED_KEY_PREFIXES)}, {', '.join(RESERVED_KEYS)}) are refused.",
    )
    tolerations: list[Toleration] | None = Field(
        default=None, max_length=32, description="Tolerations added to the trainer pods (existing mode)."
    )


# Pod metadata keys the operator sets or selects on (naming.labels, NetworkPolicies, the Job
# controller, Karpenter's disruption annotations): a job's own labels and annotations may not use them.
OPERATOR_METADATA_PREFIXES = ("finetune.ai/", "app.kubernetes.io/", "batch.kubernetes.io/", "karpenter.sh/")
OPERATOR_METADATA_KEY = Check(
    "!(" + " || ".join(f"{{v}}.startsWith('{p}')" for p in OPERATOR_METADATA_PREFIXES) + ")",
    f"must not use the operator's own prefixes ({', '.join(p + '*' for p in OPERATOR_METADATA_PREFIXES)})",
    lambda v: not v.startswith(OPERATOR_METADATA_PREFIXES),
)
# Environment the operator sets, and what torchrun and the trainer read to find their rank and
# devices: extra env cannot change them (children.build_job's own env must stay inside this list).
RESERVED_ENV = ("HOME", "HF_HOME", "HF_HUB_OFFLINE", "PYTHONUNBUFFERED", "NODE_RANK", "POD_IP", "RANK", "LOCAL_RANK",
                "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
RESERVED_ENV_PREFIX = "FINETUNE_"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
UNRESERVED_ENV = Check(
    f"!({{v}} in {_strings(RESERVED_ENV)} || {{v}}.startsWith('{RESERVED_ENV_PREFIX}'))",
    f"is set by the operator ({', '.join(RESERVED_ENV)}, {RESERVED_ENV_PREFIX}*)",
    lambda v: not (v in RESERVED_ENV or v.startswith(RESERVED_ENV_PREFIX)),
)


class EnvVar(ApiModel):
    """One environment variable of the trainer container: a plain value (credentials come from
    the Secrets the spec names, never from env)."""

    name: Annotated[str, Field(min_length=1, max_length=128, pattern=ENV_NAME), *checked(UNRESERVED_ENV)] = Field(
        description="Variable name (a C identifier), e.g. NCCL_SOCKET_IFNAME or HTTPS_PROXY.")
    value: str = Field(default="", max_length=4096, description="Its value.")


_POD_LABEL_KEYS = (
    each_key(LABEL_KEY_CHECK, "keys " + LABEL_KEY_CHECK.message.replace("must be a label key", "must be label keys")),
    each_key(OPERATOR_METADATA_KEY, "keys " + OPERATOR_METADATA_KEY.message),
)


class TrainerPodSpec(ApiModel):
    """Settings of the trainer pods a cluster may need: pull secrets, a service account, a
    priority class, metadata for sidecars and policies, environment for NCCL or proxies. The
    operator's defaults (chart value trainer.pod) apply first; a job's own values win field by
    field (labels, annotations and env merged by key)."""

    RULES = (Rule(
        "!has(self.env) || self.env.all(e, self.env.exists_one(f, f.name == e.name))",
        "env names must be unique",
        ".env",
        lambda p: p.env is None or len({e.name for e in p.env}) == len(p.env),
    ),)

    service_account_name: str | None = Field(
        default=None, max_length=253, pattern=DNS_SUBDOMAIN, description="ServiceAccount the trainer pods run as "
        "(for workload identity; no API token is mounted either way).")
    priority_class_name: str | None = Field(
        default=None, max_length=253, pattern=DNS_SUBDOMAIN, description="PriorityClass of the trainer pods.")
    image_pull_secrets: list[SecretName] | None = Field(
        default=None, max_length=8, description="Secrets for pulling the trainer image (names in the job's namespace).")
    labels: Annotated[dict[str, LabelValue], Field(max_length=32), *checked(*_POD_LABEL_KEYS)] | None = Field(
        default=None, description="Extra labels of the trainer pods.")
    annotations: Annotated[dict[str, Annotated[str, Field(max_length=4096)]], Field(max_length=32),
                           *checked(*_POD_LABEL_KEYS)] | None = Field(
        default=None, description="Extra annotations of the trainer pods, e.g. a service mesh's sidecar opt-out.")
    env: list[EnvVar] | None = Field(
        default=None, max_length=64, description="Extra environment of the trainer container (NCCL, proxies, "
        "HF_ENDPOINT for a hub mirror). Names the operator sets are refused.")


class OutputSpec(ApiModel):
    """Where the fine-tuned weights are written and under which Model name they are published."""

    destination: Annotated[str, *checked(uri_of("output.destination"), NO_PARENT_SEGMENTS)] = Field(
        max_length=1024,
        description="Where the adapter (or full weights) go: pvc://CLAIM/PATH, a directory of its own "
        f"(docs/outputs.md). {sources.NOT_YET} destinations are not supported yet.",
    )
    credentials_secret: SecretName | None = Field(
        default=None, description="Name of a Secret in the job's namespace with credentials for the destination."
    )
    model_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="Name of the Model resource to publish (a DNS subdomain); defaults to the job's name.",
    )
    delete_model_with_job: bool = Field(
        default=False,
        description="Delete the published Model when this job is deleted (by hand or by "
        "ttlSecondsAfterFinished). Off by default: the Model outlives its job, as the weights on the "
        "volume do, and keeps its lineage (spec.sourceJob, spec.baseModel, spec.dataset).",
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
        "type(self.training.globalBatchSize) == string || "
        f"int(self.training.globalBatchSize) % (self.training.microBatchSize * self.distributed.nodes * {_PROCESSES}) == 0",
        "training.globalBatchSize must be a multiple of training.microBatchSize x distributed.nodes x "
        "processes per node (resources.acceleratorsPerNode, or 1 on CPU)",
        ".training.globalBatchSize",
        lambda s: s.training.global_batch_size == "auto"
        or s.training.global_batch_size % (s.training.micro_batch_size * s.distributed.nodes * s.processes_per_node) == 0,
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
    trainer_pod: TrainerPodSpec = Field(
        default_factory=TrainerPodSpec, description="Trainer pod settings on top of the operator's defaults.",
        json_schema_extra=immutable("trainerPod"))
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
    global_batch_size: int | None = Field(
        default=None, description="Rows per optimizer step, as the trainer chose it (spec.training.globalBatchSize auto).")
    epochs: int | None = Field(default=None, description="Passes over the training split, as the trainer chose them (spec.training.epochs auto).")
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
    """A fine-tuned model published by a FineTuneJob. It outlives the job unless the job's
    spec.output.deleteModelWithJob is true; spec.sourceJob names the job that produced it."""

    api_version: str = API_VERSION
    kind: str = "Model"
    metadata: ObjectMeta
    spec: ModelSpec
    status: ModelStatus = Field(default_factory=ModelStatus)
