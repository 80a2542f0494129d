"""This node's API objects: the Node itself, its status, and its heartbeat Lease."""

from __future__ import annotations

import asyncio
import logging
import platform
from datetime import datetime, timezone
from typing import Any

from process_node.config import Config
from process_node.kube import Conflict, Kube, NotFound
from process_node.podstatus import now

Obj = dict[str, Any]
log = logging.getLogger(__name__)
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
LEASE_NAMESPACE = "kube-node-lease"
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def micro_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class NodeAgent:
    def __init__(self, kube: Kube, config: Config) -> None:
        self.kube, self.config = kube, config
        self.path = f"/api/v1/nodes/{config.node_name}"
        self.lease_path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{config.node_name}"
        self.started = now()
        self.uid = ""
        self.kubelet_version = "v0.0.0"
        self.kubelet_port = 0     # where `kubectl logs` is served; 0: not served

    def _labels(self) -> dict[str, str]:
        return {"kubernetes.io/arch": ARCH, **self.config.node_labels()}

    def status(self) -> Obj:
        c = self.config
        heartbeat = now()

        def cond(kind: str, ok: bool, reason: str, message: str) -> Obj:
            return {"type": kind, "status": "True" if ok else "False", "reason": reason, "message": message,
                    "lastHeartbeatTime": heartbeat, "lastTransitionTime": self.started}
        return {
            "capacity": dict(c.capacity), "allocatable": dict(c.capacity),
            # InternalIP only: the apiserver dials the first address type it finds (Hostname comes
            # first), and this name resolves nowhere.
            "addresses": [{"type": "InternalIP", "address": c.node_ip}],
            "conditions": [
                cond("MemoryPressure", False, "KubeletHasSufficientMemory", "process node"),
                cond("DiskPressure", False, "KubeletHasNoDiskPressure", "process node"),
                cond("PIDPressure", False, "KubeletHasSufficientPID", "process node"),
                cond("Ready", True, "KubeletReady", "process node is posting ready status"),
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
            "nodeInfo": {"architecture": ARCH, "operatingSystem": "linux", "kubeletVersion": self.kubelet_version,
                         "kubeProxyVersion": "", "containerRuntimeVersion": "process://0.1", "osImage": platform.platform(),
                         "kernelVersion": platform.release(), "machineID": "", "systemUUID": "", "bootID": ""},
        }

    async def register(self) -> None:
        """Create the Node, or adopt an existing one of ours (a restart), then post status."""
        try:
            self.kubelet_version = await self.kube.server_version() or self.kubelet_version
        except Exception:  # noqa: BLE001 - cosmetic
            pass
        spec: Obj = {"taints": [t.to_wire() for t in self.config.taints]} if self.config.taints else {}
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.config.node_name, "labels": self._labels()},
                "spec": spec, "status": self.status()}
        try:
            node = await self.kube.create("/api/v1/nodes", body)
            log.info("registered node %s", self.config.node_name)
        except Conflict:
            node = await self.kube.get(self.path)
            if (node["metadata"].get("annotations") or {}).get(KWOK_ANNOTATION):
                raise SystemExit(f"node {self.config.node_name} is a kwok node; pick another --node-name")
            node = await self.kube.merge_patch(self.path, {"metadata": {"labels": self._labels()},
                                                           "spec": {"unschedulable": None, **spec}})
            log.info("adopted existing node %s", self.config.node_name)
        self.uid = node["metadata"]["uid"]
        await self.post_status()
        await self.renew_lease()

    async def post_status(self) -> None:
        await self.kube.merge_patch(self.path + "/status", {"status": self.status()})

    async def renew_lease(self) -> None:
        spec = {"holderIdentity": self.config.node_name, "leaseDurationSeconds": self.config.lease_seconds,
                "renewTime": micro_now()}
        try:
            await self.kube.merge_patch(self.lease_path, {"spec": spec})
        except NotFound:
            owner = {"apiVersion": "v1", "kind": "Node", "name": self.config.node_name, "uid": self.uid}
            await self.kube.create(self.lease_path.rsplit("/", 1)[0], {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.config.node_name, "namespace": LEASE_NAMESPACE, "ownerReferences": [owner]},
                "spec": spec})

    async def heartbeat(self) -> None:
        """Renew the Lease every heartbeat period and post status every status period, forever."""
        loop = asyncio.get_running_loop()
        last_status = loop.time()
        while True:
            await asyncio.sleep(self.config.heartbeat_seconds)
            try:
                await self.renew_lease()
                if loop.time() - last_status >= self.config.status_seconds:
                    await self.post_status()
                    last_status = loop.time()
            except Exception as exc:  # noqa: BLE001 - keep beating through API hiccups
                log.warning("heartbeat failed: %s", exc)

    async def deregister(self) -> None:
        if self.config.keep_node:
            return
        try:
            await self.kube.delete(self.path, {"apiVersion": "v1", "kind": "DeleteOptions",
                                               "preconditions": {"uid": self.uid}})
            log.info("deleted node %s", self.config.node_name)
        except (NotFound, Conflict):
            pass
        except Exception as exc:  # noqa: BLE001 - e.g. the API server stopped first (--exit-with-pid)
            log.warning("node %s not deleted: %s", self.config.node_name, exc)
