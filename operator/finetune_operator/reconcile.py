"""Bring one FineTuneJob's children and status in line with its spec.

Level-triggered: `reconcile` reads the current objects, decides with pure functions, and acts;
it is safe to call from any event, any number of times, after a restart at any point. Creates are
idempotent (deterministic names, "already exists" returns the existing object), so an operator
killed between two steps leaves nothing that a second run would duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import kopf
from pydantic import ValidationError

from . import children, failures, kube, metrics, naming, provisioning, status
from .api import TERMINAL_PHASES, FineTuneJob, api_errors
from .kubetime import format_time, parse_time
from .model import build_model, model_status, model_to_validate, published_here
from .settings import OperatorSettings
from .sources import UnsupportedSource

log = logging.getLogger(__name__)


@dataclass
class JobState:
    """What this process keeps about one FineTuneJob between reconciles."""

    # Job events, timers and create handlers may fire together for one FineTuneJob.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    counted_failures: set[str] = field(default_factory=set)  # uids of failed pods already in RETRIES
    finished: bool = False  # terminal or gone, as the last reconcile saw it
    users: int = 0


class JobStates:
    """Per-job state of the operator process (it travels in Kopf's memo): created on a job's first
    reconcile, dropped once a reconcile finds the job finished or gone and no other is waiting."""

    def __init__(self) -> None:
        self._states: dict[tuple[str, str], JobState] = {}

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._states

    @contextlib.asynccontextmanager
    async def hold(self, namespace: str, name: str) -> AsyncIterator[JobState]:
        """The job's state, with its lock held."""
        key = (namespace, name)
        state = self._states.setdefault(key, JobState())
        state.users += 1
        try:
            async with state.lock:
                yield state
        finally:
            state.users -= 1
            if state.finished and state.users == 0 and self._states.get(key) is state:
                del self._states[key]


@dataclass
class Children:
    node_pool: dict | None
    config_map: dict
    job: dict
    service: dict | None


def build_children(ftj: FineTuneJob, settings: OperatorSettings) -> Children:
    """Every child object, built before any is created, so a bad spec creates nothing."""
    return Children(
        node_pool=provisioning.build_node_pool(ftj, settings),
        config_map=children.build_config_map(ftj, settings),
        job=children.build_job(ftj, settings),
        service=children.build_service(ftj) if children.needs_service(ftj) else None,
    )


async def reconcile(namespace: str, name: str, settings: OperatorSettings, jobs: JobStates) -> None:
    started = time.monotonic()
    try:
        async with jobs.hold(namespace, name) as state:
            raw = await kube.get("FineTuneJob", namespace, name)
            if raw is None or raw["metadata"].get("deletionTimestamp"):
                state.finished = True
                metrics.record_phase(namespace, name, None)
                return
            try:
                ftj = FineTuneJob.model_validate(raw)
            except ValidationError as exc:
                # The API server accepted what the operator cannot read: say so once, in the
                # status, rather than retrying forever.
                state.finished = True
                await _fail_unreadable(raw, exc)
                return
            metrics.record_phase(namespace, name, ftj.status.phase)
            state.finished = ftj.status.phase in TERMINAL_PHASES
            if state.finished:
                # Idempotent, and covers a crash right after the status write.
                await release_node_pool(ftj, settings)
                if ftj.status.phase == "Failed":
                    await _stop_trainer(ftj, await kube.get("Job", namespace, naming.trainer_name(ftj)), "Failed")
                await _expire(ftj)
                return
            phase = await _reconcile(raw, ftj, settings, state)
            state.finished = phase in TERMINAL_PHASES
    except Exception:
        metrics.RECONCILE_ERRORS.inc()
        raise
    finally:
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)


async def _stop_trainer(ftj: FineTuneJob, job: dict | None, phase: str) -> None:
    """Delete the trainer Job of a job the operator failed (status.must_stop_trainer says when)."""
    if status.must_stop_trainer(phase, job, ftj.metadata.uid):
        log.info("stopping trainer Job %s/%s: the operator failed the job", ftj.metadata.namespace, job["metadata"]["name"])
        await kube.delete("Job", ftj.metadata.namespace, job["metadata"]["name"])


def _seconds_since(timestamp: str | None, now: datetime) -> float | None:
    if not timestamp:
        return None
    return (now - parse_time(timestamp)).total_seconds()


async def _expire(ftj: FineTuneJob) -> None:
    """ttlSecondsAfterFinished: delete a finished job (and, through ownerReferences, its children)."""
    ttl = ftj.spec.ttl_seconds_after_finished
    finished = ftj.status.completion_time
    if ttl is None or finished is None:
        return
    if (datetime.now(timezone.utc) - finished).total_seconds() >= ttl:
        log.info("deleting %s/%s: finished more than %ss ago", ftj.metadata.namespace, ftj.metadata.name, ttl)
        await kube.delete("FineTuneJob", ftj.metadata.namespace, ftj.metadata.name)


async def release_node_pool(ftj: FineTuneJob, settings: OperatorSettings) -> None:
    """Delete the job's NodePool so Karpenter removes its nodes."""
    if provisioning.provisioner_of(ftj, settings) != "karpenter":
        return
    await release_node_pool_of(ftj.metadata.uid)


async def release_node_pool_of(uid: str) -> None:
    pool = provisioning.node_pool_name_of(uid)
    if await kube.delete("NodePool", None, pool):
        log.info("deleted NodePool %s", pool)


async def _fail(raw: dict, ftj: FineTuneJob, reason: str, message: str, settings: OperatorSettings,
                trainer_job: str | None = None) -> str:
    obs = status.Observation("Failed", reason, message, completion_time=format_time(datetime.now(timezone.utc)))
    await _write_status(raw, ftj, obs, trainer_job, settings)
    return obs.phase


async def _fail_unreadable(raw: dict, error: ValidationError) -> None:
    meta = raw["metadata"]
    if (raw.get("status") or {}).get("phase") in TERMINAL_PHASES:
        return  # a finished job stays as it finished, even if this operator cannot read it
    message = api_errors(error)
    log.info("FineTuneJob %s/%s: invalid: %s", meta["namespace"], meta["name"], message)
    await kube.patch_status("FineTuneJob", meta["namespace"], meta["name"], status.invalid_spec_patch(raw, message))
    metrics.STATUS_WRITES.inc()
    metrics.record_phase(meta["namespace"], meta["name"], "Failed")
    kopf.event(raw, type="Warning", reason="InvalidSpec", message=f"Failed: {message}")


async def _write_status(raw: dict, ftj: FineTuneJob, obs: status.Observation, trainer_job: str | None,
                        settings: OperatorSettings) -> None:
    """PATCH the status, only if that changes it; a phase change is logged, counted and posted as an event once."""
    if obs.phase in TERMINAL_PHASES:
        await release_node_pool(ftj, settings)
    patch = status.status_patch(obs, ftj, trainer_job)
    if not status.patch_changes(patch, raw.get("status")):
        return
    await kube.patch_status("FineTuneJob", ftj.metadata.namespace, ftj.metadata.name, patch)
    metrics.STATUS_WRITES.inc()
    if ftj.status.phase != obs.phase:
        _observe_transition(raw, ftj, obs)
        event_type = "Warning" if obs.phase == "Failed" else "Normal"
        kopf.event(raw, type=event_type, reason=obs.reason, message=f"{obs.phase}: {obs.message}")
        log.info("FineTuneJob %s/%s: %s -> %s (%s)", ftj.metadata.namespace, ftj.metadata.name,
                 ftj.status.phase, obs.phase, obs.reason)


def _observe_transition(raw: dict, ftj: FineTuneJob, obs: status.Observation) -> None:
    now = datetime.now(timezone.utc)
    age = _seconds_since(raw["metadata"].get("creationTimestamp"), now)
    metrics.record_phase(ftj.metadata.namespace, ftj.metadata.name, obs.phase)
    if age is None:
        return
    if obs.phase == "Running" and ftj.status.start_time is None:
        metrics.START_SECONDS.observe(age)
    if obs.phase == "Running" and ftj.status.phase == "Provisioning":
        metrics.PROVISIONING_SECONDS.observe(age)
    if obs.phase in TERMINAL_PHASES:
        metrics.JOB_SECONDS.labels(outcome=obs.phase).observe(age)


def _count_retries(pods: list[dict], counted: set[str]) -> None:
    for pod in pods:
        uid = pod["metadata"].get("uid", "")
        if pod.get("status", {}).get("phase") == "Failed" and uid not in counted:
            counted.add(uid)
            metrics.RETRIES.labels(reason=failures.classify(pod).reason).inc()


async def _sync_job(ftj: FineTuneJob, job: dict, node_pool: dict | None, settings: OperatorSettings) -> None:
    """Carry the mutable lifecycle fields over to a running trainer Job."""
    spec = job.get("spec", {})
    patch: dict = {}
    if bool(spec.get("suspend")) != ftj.spec.suspend:
        # Suspending makes the Job controller delete the pods: SIGTERM, and the trainer saves a
        # checkpoint within its grace period. Resuming recreates them; they resume from it.
        patch["suspend"] = ftj.spec.suspend
    if spec.get("activeDeadlineSeconds") != ftj.spec.active_deadline_seconds:
        patch["activeDeadlineSeconds"] = ftj.spec.active_deadline_seconds
    if patch:
        log.info("updating trainer Job of %s/%s: %s", ftj.metadata.namespace, ftj.metadata.name, patch)
        await kube.patch("Job", ftj.metadata.namespace, job["metadata"]["name"], {"spec": patch})
        job["spec"].update(patch)
    if ftj.spec.suspend:
        await release_node_pool(ftj, settings)
    elif node_pool is not None:
        await kube.ensure(node_pool)  # recreated on resume


async def _ensure_children(ftj: FineTuneJob, settings: OperatorSettings) -> dict:
    objects = build_children(ftj, settings)
    # The API server judges every child, and the Model the job will publish, before any is
    # created: a spec it accepted but whose children it would refuse fails now, creating nothing.
    for obj in (objects.node_pool, objects.config_map, objects.service, objects.job, model_to_validate(ftj)):
        if obj is not None:
            await kube.dry_run(obj)
    # Order matters: the pool is there before pods ask for capacity, and the Job's pods mount the
    # ConfigMap and (for several nodes) resolve the Service name, so those exist before the Job.
    if objects.node_pool:
        _, created = await kube.create(objects.node_pool)
        if created:
            log.info("created NodePool %s", objects.node_pool["metadata"]["name"])
    await kube.create(objects.config_map)
    if objects.service:
        await kube.create(objects.service)
    job, created = await kube.create(objects.job)
    if created:
        log.info("created trainer Job %s/%s", ftj.metadata.namespace, job["metadata"]["name"])
    return job


async def _reconcile(raw: dict, ftj: FineTuneJob, settings: OperatorSettings, state: JobState) -> str:
    """One pass for a live job; returns the phase it wrote."""
    ns = ftj.metadata.namespace
    job_name = naming.trainer_name(ftj)
    job = await kube.get("Job", ns, job_name)
    if job is None:
        try:
            job = await _ensure_children(ftj, settings)
        except (UnsupportedSource, ValidationError, ValueError, kube.Rejected) as exc:
            return await _fail(raw, ftj, "InvalidSpec", str(exc), settings)
    if job["metadata"].get("ownerReferences", [{}])[0].get("uid") != ftj.metadata.uid:
        return await _fail(raw, ftj, "NameConflict", f"a Job named {job_name} exists and belongs to something else", settings)
    if not status.job_finished(job):
        await _sync_job(ftj, job, provisioning.build_node_pool(ftj, settings), settings)
    pods = await kube.list_("Pod", ns, {"batch.kubernetes.io/controller-uid": job["metadata"]["uid"]})
    _count_retries(pods, state.counted_failures)
    if ftj.spec.distributed.nodes > 1 and not status.job_finished(job):
        for pod in status.stale_gang_members(pods):
            log.info("restarting the attempt of %s/%s: deleting pod %s, whose peer failed", ns, ftj.metadata.name, pod)
            await kube.delete("Pod", ns, pod)
    prov = None
    if provisioning.provisioner_of(ftj, settings) == "karpenter":
        prov = status.Provisioning(await _karpenter_events(ftj, pods), settings.provisioning_timeout_seconds)
    obs = status.observe(ftj, job, pods, prov)
    if obs.phase == "Succeeded" and obs.result is not None:
        try:
            conflict = await _publish_model(ftj, obs)
        except kube.Rejected as exc:  # checked by a dry run at the start; a changed CRD could still refuse it
            obs = status.Observation("Failed", "InvalidSpec", str(exc), start_time=obs.start_time,
                                     completion_time=obs.completion_time)
            conflict = None
        if conflict:
            obs = status.Observation("Failed", "ModelNameConflict", conflict, start_time=obs.start_time,
                                     completion_time=obs.completion_time)
        elif obs.phase == "Succeeded":
            kopf.event(raw, type="Normal", reason="ModelPublished", message=f"published Model {ftj.model_name}")
    await _write_status(raw, ftj, obs, job_name, settings)
    # After the status: a crash in between leaves a Failed job whose next pass stops the Job,
    # not a live job without its trainer Job (which the next pass would create again).
    await _stop_trainer(ftj, job, obs.phase)
    return obs.phase


async def _karpenter_events(ftj: FineTuneJob, pods: list[dict]) -> tuple[tuple[str, str], ...]:
    """Karpenter's words about this job: events on its NodePool and on its trainer pods."""
    pool = provisioning.node_pool_name(ftj)
    found = await kube.list_("Event", "default", fields={"involvedObject.kind": "NodePool", "involvedObject.name": pool})
    for pod in pods:
        found += await kube.list_("Event", ftj.metadata.namespace,
                                  fields={"involvedObject.kind": "Pod", "involvedObject.name": pod["metadata"]["name"]})
    found = [e for e in found if (e.get("source", {}).get("component") or e.get("reportingComponent") or "").startswith("karpenter")]
    found.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    return tuple((e.get("reason", ""), e.get("message", "")) for e in found)


async def _publish_model(ftj: FineTuneJob, obs: status.Observation) -> str | None:
    """Create the Model (once) and mark it Ready. Returns a message if the name is taken."""
    built = build_model(ftj, obs.result)
    model, _ = await kube.create(built)
    if not published_here(model, built, ftj):
        return (f"a Model named {ftj.model_name} already exists and was not published by this job; "
                "set spec.output.modelName to publish under another name")
    await kube.patch_status("Model", ftj.metadata.namespace, ftj.model_name,
                            model_status(obs.result, model["metadata"].get("generation")))
    return None
