"""The node's settings, parsed from the command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: str

    @classmethod
    def parse(cls, text: str) -> "Taint":
        """KEY[=VALUE]:EFFECT, as `kubectl taint` writes it."""
        kv, _, effect = text.rpartition(":")
        key, _, value = kv.partition("=")
        if not key or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise ValueError(f"bad taint {text!r}: want KEY[=VALUE]:NoSchedule|PreferNoSchedule|NoExecute")
        return cls(key, value, effect)

    def to_wire(self) -> dict:
        return {"key": self.key, "value": self.value, "effect": self.effect} if self.value \
            else {"key": self.key, "effect": self.effect}


@dataclass(frozen=True)
class Config:
    node_name: str = "local-0"
    kubeconfig: str | None = None
    state_dir: Path = Path(".process-node")
    volumes_root: Path | None = None          # default: state_dir / "volumes"
    claim_dirs: dict[str, Path] = field(default_factory=dict)   # --volume CLAIM=DIR
    devices: dict[str, tuple[str, ...]] = field(default_factory=dict)   # --device NAME=ID,... (devices.py)
    capacity: dict[str, str] = field(default_factory=lambda: {"cpu": "4", "memory": "16Gi", "pods": "10"})
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    node_ip: str = "127.0.0.1"
    cluster_dns: tuple[str, ...] = ()          # kubelet --cluster-dns: nameservers of ClusterFirst pods
    cluster_domain: str = "cluster.local"      # kubelet --cluster-domain
    lease_seconds: int = 40
    heartbeat_seconds: float = 10.0
    status_seconds: float = 30.0
    resync_seconds: int = 30
    shutdown_grace_seconds: float = 10.0
    restart_backoff_seconds: float = 10.0      # first restart delay; doubles up to 300 s (kubelet)
    keep_node: bool = False

    @property
    def pods_dir(self) -> Path:
        return self.state_dir / "pods"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    def claim_dir(self, claim: str) -> Path:
        if claim in self.claim_dirs:
            return self.claim_dirs[claim]
        return (self.volumes_root or self.state_dir / "volumes") / claim

    def node_labels(self) -> dict[str, str]:
        return {
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "finetune.ai/process-node": "true",
            "node.kubernetes.io/instance-type": "local-process",
            **self.labels,
        }
