"""Bring one FineTuneJob's children and status in line with its spec.

Level-triggered: `reconcile` reads the current objects, decides with pure functions, and acts;
it is safe to call from any event, any number of times, after a restart at any point. Creates are
idempotent (deterministic names, "already exists" returns the existing object), so an operator
killed between two steps leaves nothing that a second run would duplicate.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import kopf
from pydantic import ValidationError

from . import children, kube, naming, status
from .api import TERMINAL_PHASES, FineTuneJob
from .model import build_model, model_status, same_lineage
from .settings import OperatorSettings
from .sources import UnsupportedSource

log = logging.getLogger(__name__)

_locks: dict[tuple[str, str], asyncio.Lock] = {}


def _lock(namespace: str, name: str) -> asyncio.Lock:
    # Job events, timers and create handlers may fire together for one FineTuneJob.
    return _locks.setdefault((namespace, name), asyncio.Lock())


@dataclass
class Children:
    config_map: dict
    job: dict
    service: dict | None


def build_children(ftj: FineTuneJob, settings: OperatorSettings) -> Children:
    """Every child object, built before any is created, so a bad spec creates nothing."""
    return Children(
        config_map=children.build_config_map(ftj),
        job=children.build_job(ftj, settings),
        service=children.build_service(ftj) if children.needs_service(ftj) else None,
    )


async def reconcile(namespace: str, name: str, settings: OperatorSettings) -> None:
    async with _lock(namespace, name):
        raw = await kube.get("FineTuneJob", namespace, name)
        if raw is None or raw["metadata"].get("deletionTimestamp"):
            return
        ftj = FineTuneJob.model_validate(raw)
        if ftj.status.phase in TERMINAL_PHASES:
            return
        await _reconcile(raw, ftj, settings)


async def _fail(raw: dict, ftj: FineTuneJob, reason: str, message: str, trainer_job: str | None = None) -> None:
    obs = status.Observation("Failed", reason, message)
    await _write_status(raw, ftj, obs, trainer_job)


async def _write_status(raw: dict, ftj: FineTuneJob, obs: status.Observation, trainer_job: str | None) -> None:
    patch = status.status_patch(obs, ftj, trainer_job)
    if ftj.status.phase != obs.phase:
        event_type = "Warning" if obs.phase == "Failed" else "Normal"
        kopf.event(raw, type=event_type, reason=obs.reason, message=f"{obs.phase}: {obs.message}")
        log.info("FineTuneJob %s/%s: %s -> %s (%s)", ftj.metadata.namespace, ftj.metadata.name,
                 ftj.status.phase, obs.phase, obs.reason)
    await kube.patch_status("FineTuneJob", ftj.metadata.namespace, ftj.metadata.name, patch)


async def _ensure_children(ftj: FineTuneJob, settings: OperatorSettings) -> dict:
    objects = build_children(ftj, settings)
    # Order matters: the Job's pods mount the ConfigMap and (for several nodes) resolve the
    # Service name, so both exist before the Job.
    await kube.create(objects.config_map)
    if objects.service:
        await kube.create(objects.service)
    job, created = await kube.create(objects.job)
    if created:
        log.info("created trainer Job %s/%s", ftj.metadata.namespace, job["metadata"]["name"])
    return job


async def _reconcile(raw: dict, ftj: FineTuneJob, settings: OperatorSettings) -> None:
    ns = ftj.metadata.namespace
    job_name = naming.trainer_name(ftj)
    job = await kube.get("Job", ns, job_name)
    if job is None:
        try:
            job = await _ensure_children(ftj, settings)
        except (UnsupportedSource, ValidationError) as exc:
            await _fail(raw, ftj, "InvalidSpec", str(exc))
            return
    if job["metadata"].get("ownerReferences", [{}])[0].get("uid") != ftj.metadata.uid:
        await _fail(raw, ftj, "NameConflict", f"a Job named {job_name} exists and belongs to something else")
        return
    pods = await kube.list_("Pod", ns, {"batch.kubernetes.io/controller-uid": job["metadata"]["uid"]})
    obs = status.observe(ftj, job, pods)
    if obs.phase == "Succeeded" and obs.result is not None:
        conflict = await _publish_model(ftj, obs)
        if conflict:
            obs = status.Observation("Failed", "ModelNameConflict", conflict, start_time=obs.start_time,
                                     completion_time=obs.completion_time)
        else:
            kopf.event(raw, type="Normal", reason="ModelPublished", message=f"published Model {ftj.model_name}")
    await _write_status(raw, ftj, obs, job_name)


async def _publish_model(ftj: FineTuneJob, obs: status.Observation) -> str | None:
    """Create the Model (once) and mark it Ready. Returns a message if the name is taken."""
    model, _ = await kube.create(build_model(ftj, obs.result))
    if not same_lineage(model, ftj):
        return (f"a Model named {ftj.model_name} already exists and was published by another job; "
                "set spec.output.modelName to publish under another name")
    await kube.patch_status("Model", ftj.metadata.namespace, ftj.model_name,
                            model_status(obs.result, model["metadata"].get("generation")))
    return None
