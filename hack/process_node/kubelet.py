"""The node's main loop: register, heartbeat, list-watch the pods bound here, one worker each."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

from process_node.config import Config
from process_node.kube import Kube
from process_node.logserver import LogServer
from process_node.devices import Devices
from process_node.node import NodeAgent
from process_node.worker import PodWorker

Obj = dict[str, Any]
log = logging.getLogger(__name__)
HIDDEN_ENV = ("KUBECONFIG",)  # the node's credentials are not the container's


def base_env() -> dict[str, str]:
    """What a container inherits before its own env: this program's environment, standing in
    for an image's ENV, with this interpreter's bin directory (the venv's) first on PATH so
    console scripts such as `finetune-trainer` resolve even when the venv is not activated."""
    env = {k: v for k, v in os.environ.items() if k not in HIDDEN_ENV}
    bin_dir = os.path.dirname(sys.executable)
    path = env.get("PATH", os.defpath).split(os.pathsep)
    env["PATH"] = os.pathsep.join([bin_dir] + [p for p in path if p != bin_dir])
    return env


class Kubelet:
    def __init__(self, kube: Kube, config: Config) -> None:
        self.kube, self.config = kube, config
        self.node = NodeAgent(kube, config)
        self.workers: dict[str, PodWorker] = {}
        self._env = base_env()
        self.devices = Devices(config.devices)
        self.logs = LogServer(self.log_path, self.running)

    async def run(self) -> None:
        for d in (self.config.pods_dir, self.config.logs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.node.kubelet_port = await self.logs.start(self.config.state_dir, self.config.node_ip)
        await self.node.register()
        heartbeat = asyncio.create_task(self.node.heartbeat(), name="heartbeat")
        try:
            await self._list_watch()
        finally:
            heartbeat.cancel()
            await self.shutdown()
            await self.logs.stop()

    def _workers_of(self, namespace: str, pod: str) -> list[PodWorker]:
        return [w for w in self.workers.values() if w.name == f"{namespace}/{pod}"]

    def log_path(self, namespace: str, pod: str, container: str) -> Path | None:
        """The newest log of that container of that pod name (a Job may reuse no names, but
        a re-created pod of the same name gets a new uid and a new directory)."""
        found = sorted(self.config.logs_dir.glob(f"{namespace}_{pod}_*/{container}.log"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None

    def running(self, namespace: str, pod: str) -> bool:
        return any(w.running for w in self._workers_of(namespace, pod))

    async def shutdown(self) -> None:
        workers = list(self.workers.values())
        log.info("shutting down: stopping %d pod(s)", len(workers))
        await asyncio.gather(*(w.stop(self.config.shutdown_grace_seconds) for w in workers), return_exceptions=True)
        await asyncio.gather(*(w.task for w in workers if w.task), return_exceptions=True)
        await self.node.deregister()

    async def _list_watch(self) -> None:
        path = "/api/v1/pods"
        selector = f"spec.nodeName={self.config.node_name}"
        while True:
            try:
                listing = await self.kube.list(path, fieldSelector=selector)
                self._sync([p for p in listing["items"]])
                version = listing["metadata"]["resourceVersion"]
                async for kind, obj in self.kube.watch(path, version, self.config.resync_seconds, fieldSelector=selector):
                    if kind in ("ADDED", "MODIFIED"):
                        self._dispatch(obj)
                    elif kind == "DELETED":
                        self._forget(obj["metadata"]["uid"])
                    elif kind == "ERROR":
                        log.info("watch error %s: listing again", obj.get("code"))
                        break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - an API hiccup: list again
                log.warning("pod watch failed: %s; retrying", exc)
                await asyncio.sleep(1)

    def _sync(self, pods: list[Obj]) -> None:
        uids = {p["metadata"]["uid"] for p in pods}
        for uid in [u for u in self.workers if u not in uids]:
            self._forget(uid)
        for pod in pods:
            self._dispatch(pod)

    def _dispatch(self, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if worker is None:
            worker = self.workers[uid] = PodWorker(pod, self.kube, self.config, self._env, self._admitted_pods,
                                                   self.devices)
            worker.task = asyncio.create_task(worker.run(), name=f"pod {worker.name}")
            log.info("pod %s bound here", worker.name)
        else:
            worker.update(pod)

    def _admitted_pods(self) -> list[Obj]:
        """Pods admitted here whose container has not ended (the kubelet's active pods)."""
        return [w.pod for w in self.workers.values() if w.admitted and not w.finished]

    def _forget(self, uid: str) -> None:
        """The pod object is gone (force-deleted, or deleted by us): kill anything left at once."""
        worker = self.workers.pop(uid, None)
        if worker is not None:
            log.info("pod %s gone", worker.name)
            asyncio.create_task(self._reap(worker))

    async def _reap(self, worker: PodWorker) -> None:
        await worker.stop(0)
        self.devices.release(worker.uid)  # its worker may be cancelled before it releases them
        worker.cleanup()
