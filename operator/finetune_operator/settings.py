"""Operator-wide settings, read once from the environment (the Helm chart sets them).

`main` builds them once at startup and hands them to the handlers through Kopf's memo. They are
validated there, JSON-valued chart values included, as typed values: a bad chart value stops the
operator with one line naming the variable (`load`), and never surfaces as a user's job failing.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from . import __version__
from .api import DNS_SUBDOMAIN, Quantity, TrainerPodSpec

ENV_PREFIX = "FINETUNE_"


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class NodeClassRef(_Wire):
    """A Karpenter nodeClassRef."""

    group: str = Field(min_length=1)
    kind: str = Field(min_length=1)
    name: str = Field(min_length=1)


class PoolRequirement(_Wire):
    """One Karpenter NodePool requirement: a node selector requirement, plus minValues."""

    key: str = Field(min_length=1)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: list[str] | None = None
    min_values: int | None = Field(default=None, ge=1)


# Where each JSON-valued setting comes from in the chart, for the startup error.
CHART_VALUES = {
    "karpenter_node_class": "karpenter.nodeClassRef",
    "cpu_pool_requirements": "karpenter.cpuPoolRequirements",
    "gpu_pool_requirements": "karpenter.gpuPoolRequirements",
    "trainer_pod": "trainer.pod",
    "trainer_run_as_user": "trainer.runAsUser",
    "model_cache_claim": "modelCache.claim",
    "hub_scratch_size": "modelCache.scratchSize",
}


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True)

    trainer_image: str = Field(
        default=f"finetune-trainer:{__version__}",
        description="Image of the trainer container (the chart sets it; this default is what `make images` builds).",
    )
    trainer_image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    trainer_host_network: bool = Field(
        default=False,
        description="Run trainer pods in the node's network namespace (nodes without a pod network, RDMA NICs).",
    )
    trainer_pod: Annotated[TrainerPodSpec, NoDecode] = Field(
        default_factory=TrainerPodSpec,
        description="Defaults for every trainer pod as JSON, the schema of a FineTuneJob's spec.trainerPod "
        "(pull secrets, service account, priority class, labels, annotations, env); a job's own values win.",
    )
    trainer_run_as_user: int | None = Field(
        default=1000, ge=1, description="UID (and GID, fsGroup) of the trainer pods; empty leaves them to the "
        "cluster (OpenShift's assigned UID ranges). The image runs as any non-root UID.",
    )
    model_cache_claim: str = Field(
        default="", max_length=253, pattern=f"^$|{DNS_SUBDOMAIN}",  # empty, or a claim name
        description="A PersistentVolumeClaim in each job's namespace that hf:// base models are downloaded into and "
        "read from, shared by that namespace's jobs (the hub's cache layout: one copy per repository and revision; "
        "ReadWriteMany for jobs on several nodes). Empty: each pod downloads into its own scratch space.",
    )
    hub_scratch_size: Quantity | None = Field(
        default=None, description="Without a model cache claim: the ephemeral storage a pod downloading an hf:// "
        "model requests, and the size limit of the scratch directory it downloads into (e.g. 40Gi for an 8B model).",
    )
    default_provisioner: Literal["karpenter", "existing", "none"] = "none"
    namespaces: str = Field(default="", description="Comma-separated namespaces to watch; empty watches all.")
    lease_name: str = "finetune-operator"
    lease_namespace: str = "default"
    identity: str = Field(default="", description="Leader-election identity; the pod name in a cluster.")
    metrics_port: int = 8080
    health_port: int = 8081
    progress_port: int = 8082
    progress_url: str = Field(
        default="",
        description="URL of this operator's progress endpoint as trainer pods reach it, e.g. "
        "http://finetune-operator.finetune-system.svc:8082; empty disables live progress.",
    )
    progress_interval_seconds: float = Field(default=5.0, description="Shortest gap between two progress writes per job.")
    # The progress endpoint is reachable from the pod network without credentials, so what one
    # client can make it hold or do is bounded (progress_server, guard).
    progress_max_connections: int = Field(default=512, ge=1, description="Open connections to the progress endpoint, all clients.")
    progress_max_connections_per_client: int = Field(default=32, ge=1, description="Open connections per client address.")
    progress_header_timeout_seconds: float = Field(
        default=5.0, gt=0, description="Close a connection that has not sent a whole request head by then (and idle ones).")
    progress_request_timeout_seconds: float = Field(default=10.0, gt=0, description="Longest time one progress request may take.")
    progress_reviews_per_second: float = Field(
        default=20.0, gt=0, description="TokenReviews of unknown tokens per second, all clients (twice as many at once).")
    progress_lookups_per_client_per_second: float = Field(
        default=5.0, gt=0, description="Uncached token reviews and authorization reads per second per client address.")
    karpenter_node_class: Annotated[NodeClassRef | None, NoDecode] = Field(
        default=None,
        description='Default Karpenter nodeClassRef as JSON, e.g. {"group":"karpenter.k8s.aws","kind":"EC2NodeClass","name":"default"}.',
    )
    cpu_pool_requirements: Annotated[tuple[PoolRequirement, ...], NoDecode] = Field(
        default=(), description="Extra NodePool requirements (JSON list) for CPU-only jobs, e.g. to pick CPU families."
    )
    gpu_pool_requirements: Annotated[tuple[PoolRequirement, ...], NoDecode] = Field(
        default=(), description="Extra NodePool requirements (JSON list) for GPU jobs."
    )
    provisioning_timeout_seconds: float = Field(
        default=900, gt=0, description="Fail a job whose trainer pods are still unscheduled after this long."
    )
    input_timeout_seconds: float = Field(
        default=600, gt=0, description="Fail a job whose claims, ConfigMaps or Secrets are still missing after this long.")
    mount_timeout_seconds: float = Field(
        default=300, gt=0, description="Fail a job (ConfigError) whose scheduled trainer pod still waits for its volumes "
        "or env (ContainerCreating, CreateContainerConfigError: a missing Secret, key or claim) after this long.")
    # How often every live FineTuneJob is reconciled even without events: the safety net that
    # makes missed watch events harmless.
    resync_seconds: float = Field(default=30.0, gt=0)
    crash_points_dir: str | None = Field(
        default=None, description="Tests only: a directory of armed crash points (crashpoints.py); never set in a cluster.")

    @field_validator("karpenter_node_class", "cpu_pool_requirements", "gpu_pool_requirements", "trainer_pod", mode="before")
    @classmethod
    def _json(cls, value: Any, info: ValidationInfo) -> Any:
        """The chart passes these as JSON; empty means unset."""
        if not isinstance(value, str):
            return value
        if not value.strip():
            return {"karpenter_node_class": None, "trainer_pod": {}}.get(info.field_name, ())
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg} at character {exc.pos})") from None

    @field_validator("trainer_run_as_user", "hub_scratch_size", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _default_pool_needs_a_node_class(self) -> "OperatorSettings":
        if self.default_provisioner == "karpenter" and self.karpenter_node_class is None:
            raise ValueError("the default provisioner is karpenter but no default node class is set "
                             f"({ENV_PREFIX}KARPENTER_NODE_CLASS, chart value karpenter.nodeClassRef)")
        return self

    @property
    def watched_namespaces(self) -> list[str]:
        return [n.strip() for n in self.namespaces.split(",") if n.strip()]


def describe(error: ValidationError) -> str:
    """A settings error as one line that names the environment variables (and chart values) at fault."""
    problems = []
    for item in error.errors():
        field, *rest = item["loc"] or ("settings",)
        where = f"{ENV_PREFIX}{str(field).upper()}" if field in OperatorSettings.model_fields else str(field)
        where += "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in rest)
        if field in CHART_VALUES:
            where += f" (chart value {CHART_VALUES[field]})"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if field in OperatorSettings.model_fields else message)
    return "invalid settings: " + "; ".join(problems)


def load() -> OperatorSettings:
    """The settings from the environment; raises SystemExit with one clear line if they are bad."""
    try:
        return OperatorSettings()
    except ValidationError as exc:
        raise SystemExit(f"finetune-operator: {describe(exc)}") from None
