"""Leader election on a coordination.k8s.io Lease, so two replicas never both act.

The same protocol as client-go's leaderelection: a candidate takes the Lease when it is free or
its holder stopped renewing for leaseDurationSeconds (judged by this process's own clock, from
when it last saw the record change, so clock skew between hosts does not matter); the leader
renews every `renew_seconds`; every write is a compare-and-swap on resourceVersion. A leader that
cannot renew within `renew_deadline` steps down by stopping the operator, and the process exits so
Kubernetes restarts it as a candidate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone

from . import kube

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    def __init__(self, name: str, namespace: str, identity: str, *, lease_seconds: int = 15,
                 renew_seconds: float = 5, retry_seconds: float = 2, renew_deadline: float = 10) -> None:
        self.name, self.namespace, self.identity = name, namespace, identity
        self.lease_seconds = lease_seconds
        self.renew_seconds, self.retry_seconds, self.renew_deadline = renew_seconds, retry_seconds, renew_deadline
        self._observed: tuple[str | None, float] = (None, 0.0)  # (resourceVersion, monotonic time seen)
        self.lost = asyncio.Event()

    def _lease(self, current: dict | None, transitions: int) -> dict:
        now = _now()
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_seconds,
                "acquireTime": now, "renewTime": now, "leaseTransitions": transitions}
        if current is None:
            return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace}, "spec": spec}
        if current.get("spec", {}).get("holderIdentity") == self.identity:
            spec["acquireTime"] = current["spec"].get("acquireTime", now)
        # The Lease as read, edited: its resourceVersion makes the write a compare-and-swap, and
        # its labels, annotations, owners and spec fields this code does not set are kept.
        return {**current, "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "spec": {**current.get("spec", {}), **spec}}

    def _expired(self, current: dict) -> bool:
        version = current["metadata"]["resourceVersion"]
        if version != self._observed[0]:
            self._observed = (version, time.monotonic())
        spec = current.get("spec", {})
        if not spec.get("holderIdentity"):
            return True
        duration = spec.get("leaseDurationSeconds") or self.lease_seconds
        return time.monotonic() - self._observed[1] > duration

    async def try_acquire_or_renew(self) -> bool:
        current = await kube.get("Lease", self.namespace, self.name)
        if current is None:
            _, created = await kube.create(self._lease(None, 0))
            return created
        spec = current.get("spec", {})
        mine = spec.get("holderIdentity") == self.identity
        if not mine and not self._expired(current):
            return False
        transitions = (spec.get("leaseTransitions") or 0) + (0 if mine else 1)
        updated = await kube.replace(self._lease(current, transitions))
        if updated:
            self._observed = (updated["metadata"]["resourceVersion"], time.monotonic())
        return updated is not None

    async def acquire(self) -> None:
        log.info("waiting to lead as %s (Lease %s/%s)", self.identity, self.namespace, self.name)
        while True:
            try:
                if await self.try_acquire_or_renew():
                    log.info("became leader as %s", self.identity)
                    return
            except Exception as exc:  # the API server may be restarting; keep trying
                log.warning("leader election: %s", exc)
            await asyncio.sleep(self.retry_seconds)

    async def keep(self, stop: asyncio.Event) -> None:
        """Renew until `stop` is set; on failure set `lost` and `stop`."""
        last_renewed = time.monotonic()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.renew_seconds)
                break
            except asyncio.TimeoutError:
                pass
            try:
                # Bounded by the deadline: a call that hangs (a connection gone silent) must not
                # keep a leader acting after a standby has taken the expired Lease.
                left = self.renew_deadline - (time.monotonic() - last_renewed)
                async with asyncio.timeout(max(left, 0.001)):
                    renewed = await self.try_acquire_or_renew()
                if renewed:
                    last_renewed = time.monotonic()
                    continue
                log.error("leadership taken over by another replica")
            except Exception as exc:
                if time.monotonic() - last_renewed < self.renew_deadline:
                    log.warning("could not renew the Lease, retrying: %s", exc if str(exc) else "no answer in time")
                    continue
                log.error("could not renew the Lease within %ss: %s", self.renew_deadline,
                          exc if str(exc) else "the API server did not answer in time")
            self.lost.set()
            stop.set()
            return

    async def release(self) -> None:
        """Hand the Lease back so another replica takes over at once, not after it expires."""
        try:
            current = await kube.get("Lease", self.namespace, self.name)
            if current and current.get("spec", {}).get("holderIdentity") == self.identity:
                current["spec"]["holderIdentity"] = ""
                current["spec"]["renewTime"] = _now()
                current["spec"]["leaseDurationSeconds"] = 1
                await kube.replace({**current, "apiVersion": "coordination.k8s.io/v1", "kind": "Lease"})
        except Exception as exc:
            log.warning("could not release the Lease: %s", exc)
