"""Devices a node owns, handed to containers as a device plugin would.

A node started with `--device nvidia.com/gpu=0,1` advertises `nvidia.com/gpu: 2` and gives each
container that asks for the resource (in its limits, as extended resources must be asked for)
devices of its own, for as long as the pod runs. The container learns them from its environment:
CUDA_VISIBLE_DEVICES, since this node has no container toolkit to hide the other GPUs from a
process, and NVIDIA_VISIBLE_DEVICES, which the NVIDIA device plugin sets. Two nodes on one host
that own disjoint shares of its GPUs so each see only their own, as two machines would.

Assignment happens at admission, with no await between the check and the record (like the port
check), so two pods can never be given the same device.
"""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]
VISIBILITY_ENV = {"nvidia.com/gpu": ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")}


class DeviceError(Exception):
    """The node cannot give the container what it asks for (kubelet: UnexpectedAdmissionError)."""


def parse(text: str) -> tuple[str, tuple[str, ...]]:
    """NAME=ID[,ID...], e.g. nvidia.com/gpu=0,1."""
    name, _, ids = text.partition("=")
    owned = tuple(i.strip() for i in ids.split(",") if i.strip())
    if not name or not owned or len(set(owned)) != len(owned):
        raise ValueError(f"bad device {text!r}: want NAME=ID[,ID...] with distinct IDs, e.g. nvidia.com/gpu=0,1")
    return name, owned


def requested(container: Obj, resource: str) -> int:
    limits = (container.get("resources") or {}).get("limits") or {}
    return int(str(limits.get(resource, 0)))


class Devices:
    def __init__(self, owned: dict[str, tuple[str, ...]] | None = None) -> None:
        self.owned = dict(owned or {})
        self.assigned: dict[str, dict[str, tuple[str, ...]]] = {}   # pod uid -> resource -> ids

    def allocate(self, uid: str, container: Obj) -> dict[str, str]:
        """The container's share of each owned resource, as environment variables."""
        if uid in self.assigned:
            return self._env(self.assigned[uid])
        share: dict[str, tuple[str, ...]] = {}
        for resource, ids in self.owned.items():
            want = requested(container, resource)
            if not want:
                continue
            taken = {i for pod in self.assigned.values() for i in pod.get(resource, ())}
            free = [i for i in ids if i not in taken]
            if want > len(free):
                raise DeviceError(f"{resource}: {want} requested, {len(free)} of {len(ids)} free on this node")
            share[resource] = tuple(free[:want])
        self.assigned[uid] = share
        return self._env(share)

    def release(self, uid: str) -> None:
        self.assigned.pop(uid, None)

    @staticmethod
    def _env(share: dict[str, tuple[str, ...]]) -> dict[str, str]:
        env = {}
        for resource, ids in share.items():
            for name in VISIBILITY_ENV.get(resource, ()):
                env[name] = ",".join(ids)
        return env
