"""Operator-wide settings, read once from the environment (the Helm chart sets them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FINETUNE_", frozen=True)

    trainer_image: str = Field(
        default="finetune-trainer:0.1.0",
        description="Image of the trainer container.",
    )
    trainer_image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    trainer_host_network: bool = Field(
        default=False,
        description="Run trainer pods in the node's network namespace (nodes without a pod network, RDMA NICs).",
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
    karpenter_node_class: str = Field(
        default="",
        description='Default Karpenter nodeClassRef as JSON, e.g. {"group":"karpenter.k8s.aws","kind":"EC2NodeClass","name":"default"}.',
    )
    cpu_pool_requirements: str = Field(
        default="", description="Extra NodePool requirements (JSON list) for CPU-only jobs, e.g. to pick CPU families."
    )
    gpu_pool_requirements: str = Field(default="", description="Extra NodePool requirements (JSON list) for GPU jobs.")
    provisioning_timeout_seconds: float = Field(
        default=900, description="Fail a job whose trainer pods are still unscheduled after this long."
    )
    # How often every live FineTuneJob is reconciled even without events: the safety net that
    # makes missed watch events harmless.
    resync_seconds: float = 30.0

    @property
    def watched_namespaces(self) -> list[str]:
        return [n.strip() for n in self.namespaces.split(",") if n.strip()]
