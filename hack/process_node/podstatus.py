"""Pod status documents as the kubelet writes them (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

Obj = dict[str, Any]


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Terminated:
    exit_code: int
    reason: str          # Completed | Error | StartError | ...
    message: str
    started_at: str
    finished_at: str
    signal: int | None = None

    def to_wire(self, container_id: str) -> Obj:
        state: Obj = {"exitCode": self.exit_code, "reason": self.reason, "startedAt": self.started_at,
                      "finishedAt": self.finished_at, "containerID": container_id}
        if self.message:
            state["message"] = self.message
        if self.signal:
            state["signal"] = self.signal
        return state


def _conditions(ts: str, *, initialized: bool, ready: bool, reason: str = "") -> list[Obj]:
    def cond(kind: str, ok: bool) -> Obj:
        c: Obj = {"type": kind, "status": "True" if ok else "False", "lastProbeTime": None, "lastTransitionTime": ts}
        if not ok and reason:
            c["reason"] = reason
        return c
    return [cond("PodReadyToStartContainers", initialized), cond("Initialized", initialized),
            cond("Ready", ready), cond("ContainersReady", ready), cond("PodScheduled", True)]


def _base(pod: Obj, ip: str) -> Obj:
    return {"hostIP": ip, "hostIPs": [{"ip": ip}], "podIP": ip, "podIPs": [{"ip": ip}],
            "startTime": (pod.get("status") or {}).get("startTime") or now()}


def _container(container: Obj, state: Obj, *, ready: bool, container_id: str = "", restart_count: int = 0,
               last_state: Obj | None = None) -> Obj:
    status: Obj = {"name": container["name"], "image": container.get("image", ""), "imageID": "",
                   "ready": ready, "started": "running" in state, "restartCount": restart_count, "state": state}
    if container_id:
        status["containerID"] = container_id
    if last_state:
        status["lastState"] = last_state
    return status


def waiting(pod: Obj, container: Obj, ip: str, reason: str, message: str) -> Obj:
    """Pending: the container cannot be created yet (kubelet: ContainerCreating, CreateContainerConfigError)."""
    return {**_base(pod, ip), "phase": "Pending",
            "conditions": _conditions(now(), initialized=True, ready=False, reason="ContainersNotReady"),
            "containerStatuses": [_container(container, {"waiting": {"reason": reason, "message": message}}, ready=False)]}


def running(pod: Obj, container: Obj, ip: str, started_at: str, container_id: str, restart_count: int = 0,
            last_state: Obj | None = None) -> Obj:
    return {**_base(pod, ip), "phase": "Running", "conditions": _conditions(started_at, initialized=True, ready=True),
            "containerStatuses": [_container(container, {"running": {"startedAt": started_at}}, ready=True,
                                             container_id=container_id, restart_count=restart_count,
                                             last_state=last_state)]}


def back_off(pod: Obj, container: Obj, ip: str, last: Terminated, container_id: str, restart_count: int,
             seconds: float) -> Obj:
    """A container that exited and will be restarted (restartPolicy Always/OnFailure): the pod
    stays Running, not ready, the container waiting in CrashLoopBackOff (as the kubelet reports)."""
    message = f"back-off {seconds:g}s restarting failed container={container['name']} pod={pod['metadata']['name']}"
    return {**_base(pod, ip), "phase": "Running",
            "conditions": _conditions(now(), initialized=True, ready=False, reason="ContainersNotReady"),
            "containerStatuses": [_container(container, {"waiting": {"reason": "CrashLoopBackOff", "message": message}},
                                             ready=False, container_id=container_id, restart_count=restart_count,
                                             last_state={"terminated": last.to_wire(container_id)})]}


def terminated(pod: Obj, container: Obj, ip: str, result: Terminated, container_id: str, restart_count: int = 0) -> Obj:
    phase = "Succeeded" if result.exit_code == 0 else "Failed"
    return {**_base(pod, ip), "phase": phase,
            "conditions": _conditions(result.finished_at, initialized=True, ready=False, reason="PodCompleted"),
            "containerStatuses": [_container(container, {"terminated": result.to_wire(container_id)}, ready=False,
                                             container_id=container_id, restart_count=restart_count)]}


def rejected(pod: Obj, ip: str, reason: str, message: str) -> Obj:
    """The pod cannot run here at all (kubelet admission failure): Failed, with no container started."""
    return {**_base(pod, ip), "phase": "Failed", "reason": reason, "message": message,
            "conditions": _conditions(now(), initialized=False, ready=False, reason="PodFailed")}


def patch(pod: Obj, status: Obj) -> Obj:
    """A merge patch for pods/status; the uid makes it apply only to this very pod."""
    return {"metadata": {"uid": pod["metadata"]["uid"]}, "status": status}
