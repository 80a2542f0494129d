"""Bring one FineTuneJob's children and status in line with its spec.

Level-triggered: `reconcile` reads the current objects, decides with pure functions, and acts;
it is safe to call from any event, any number of times, after a restart at any point. Creates are
idempotent (deterministic names, "already exists" returns the existing object), so an operator
killed between two steps leaves nothing that a second run would duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import kopf
from pydantic import ValidationError

from . import checkpoint_key, children, crashpoints, destinations, failures, kube, metrics, naming, provisioning, status
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
    network_policy: dict
    key_secret: dict | None = None


def build_children(ftj: FineTuneJob, settings: OperatorSettings, key: bytes | None = None) -> Children:
    """Every child object, built before any is created, so a bad spec creates nothing. `key`:
    the job's new checkpoint key (checkpoint_key.py); the ConfigMap names its digest."""
    return Children(
        node_pool=provisioning.build_node_pool(ftj, settings),
        config_map=children.build_config_map(ftj, settings, checkpoint_key.key_sha256(key) if key else None),
        job=children.build_job(ftj, settings),
        service=children.build_service(ftj) if children.needs_service(ftj) else None,
        network_policy=children.build_network_policy(ftj),
        key_secret=checkpoint_key.build_secret(ftj, key) if key else None,
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


async def _wait_for_inputs(raw: dict, ftj: FineTuneJob, message: str, settings: OperatorSettings) -> str:
    """Pending while what the pods mount is missing (it may be applied with the job, in any
    order); Failed/ConfigError once that has lasted settings.input_timeout_seconds."""
    age = _seconds_since(raw["metadata"].get("creationTimestamp"), datetime.now(timezone.utc)) or 0.0
    if age >= settings.input_timeout_seconds:
        return await _fail(raw, ftj, "ConfigError", f"{message} (waited {int(age)}s)", settings)
    obs = status.Observation("Pending", "WaitingForInputs", message)
    await _write_status(raw, ftj, obs, None, settings)
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
        crashpoints.reached(settings, crashpoints.status_written(obs.phase), ftj.metadata.namespace, ftj.metadata.name)


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


class NameTaken(Exception):
    """A child's name is held by an object this job does not control."""


class MissingInputs(Exception):
    """Claims or ConfigMaps the trainer pods mount do not exist (yet)."""


# What a trainer pod mounts, by volume source: (the volume's key, the field with the name, kind).
# Secrets are left out: the operator may not read Secrets (least privilege), and even a
# metadata-only GET needs that permission.
MOUNTED_KINDS = (("persistentVolumeClaim", "claimName", "PersistentVolumeClaim"), ("configMap", "name", "ConfigMap"))


def mounted_objects(job: dict, own: set[str]) -> list[tuple[str, str]]:
    """(kind, name) of every claim and ConfigMap the trainer Job's pods mount, less the ones the
    operator creates itself (`own`)."""
    found = []
    for volume in job["spec"]["template"]["spec"].get("volumes", []):
        for key, name_field, kind in MOUNTED_KINDS:
            name = (volume.get(key) or {}).get(name_field)
            if name and name not in own and (kind, name) not in found:
                found.append((kind, name))
        for projected in (volume.get("projected") or {}).get("sources", []):
            for key, name_field, kind in MOUNTED_KINDS[1:]:
                name = (projected.get(key) or {}).get(name_field)
                if name and name not in own and (kind, name) not in found:
                    found.append((kind, name))
    return found


async def _check_inputs(job: dict, own: set[str]) -> None:
    """A pod that mounts a missing claim or ConfigMap waits forever holding its nodes: check they
    exist before the Job does."""
    namespace = job["metadata"]["namespace"]
    missing = [f"{kind} {name}" for kind, name in mounted_objects(job, own)
               if await kube.exists(kind, namespace, name) is False]
    if missing:
        raise MissingInputs(f"the trainer pods mount {', '.join(missing)}, which do not exist in namespace {namespace}")


async def _create_owned(obj: dict, ftj: FineTuneJob) -> None:
    """Create a child, or adopt the existing one only if this job controls it; one whose content
    is not what this job would write (an edit, an older operator, a forgery) is replaced."""
    existing, created = await kube.create(obj)
    if created:
        return
    meta = obj["metadata"]
    if not naming.controlled_by(existing, ftj.metadata.uid):
        raise NameTaken(f"a {obj['kind']} named {meta['name']} exists and belongs to something else")
    fields = {"ConfigMap": ("data",), "NetworkPolicy": ("spec",)}.get(obj["kind"], ())
    if any(existing.get(f) != obj.get(f) for f in fields):
        log.info("replacing %s %s/%s: not what this job would write", obj["kind"], meta["namespace"], meta["name"])
        replaced = await kube.replace({**obj, "metadata": {**meta, "resourceVersion": existing["metadata"]["resourceVersion"]}})
        if replaced is None:
            raise kopf.TemporaryError(f"{obj['kind']} {meta['name']} changed while being replaced", delay=1)
    elif obj["kind"] == "Service" and any(existing["spec"].get(f) != obj["spec"].get(f) for f in ("selector", "ports")):
        # A Service's clusterIP cannot change in place: delete it; the next pass creates ours.
        await kube.delete("Service", meta["namespace"], meta["name"])
        raise kopf.TemporaryError(f"Service {meta['name']} was not this job's; recreating it", delay=1)


async def _create_key_secret(secret: dict) -> None:
    """Create the job's checkpoint-key Secret. Called only while the trainer Job does not exist,
    so no key has been used yet: one that exists already (this operator's, from a pass that
    stopped before the Job; or anyone's, with a key they may know) is deleted and a fresh one
    created, unread (the operator may not get Secrets). The ConfigMap, written after this,
    carries the new key's digest, which the trainer checks (checkpoint_key.py)."""
    meta = secret["metadata"]
    if await kube.create_new(secret):
        return
    log.info("replacing Secret %s/%s: the trainer Job does not exist yet, so its key is not trusted",
             meta["namespace"], meta["name"])
    await kube.delete("Secret", meta["namespace"], meta["name"])
    if not await kube.create_new(secret):
        raise NameTaken(f"a Secret named {meta['name']} exists and belongs to something else (it could not be replaced)")


async def _ensure_children(ftj: FineTuneJob, settings: OperatorSettings) -> dict:
    objects = build_children(ftj, settings, checkpoint_key.new_key())
    await _check_inputs(objects.job, own={objects.config_map["metadata"]["name"]})
    # The API server judges every child, and the Model the job will publish, before any is
    # created: a spec it accepted but whose children it would refuse fails now, creating nothing.
    for obj in (objects.node_pool, objects.key_secret, objects.config_map, objects.service, objects.network_policy,
                objects.job, model_to_validate(ftj)):
        if obj is not None:
            await kube.dry_run(obj)
    # Order matters: the pool is there before pods ask for capacity, and the Job's pods mount the
    # ConfigMap and (for several nodes) resolve the Service name, so those exist before the Job.
    crash_point = functools.partial(crashpoints.reached, settings, namespace=ftj.metadata.namespace, name=ftj.metadata.name)
    if objects.node_pool:
        _, created = await kube.create(objects.node_pool)
        if created:
            log.info("created NodePool %s", objects.node_pool["metadata"]["name"])
            crash_point(crashpoints.created("NodePool"))
    # The key Secret before the ConfigMap that names its digest, both before the Job that mounts them.
    if objects.key_secret:
        await _create_key_secret(objects.key_secret)
        crash_point(crashpoints.created("Secret"))
    await _create_owned(objects.config_map, ftj)
    crash_point(crashpoints.created("ConfigMap"))
    if objects.service:
        await _create_owned(objects.service, ftj)
        crash_point(crashpoints.created("Service"))
    await _create_owned(objects.network_policy, ftj)  # before the pods it admits peers to
    crash_point(crashpoints.created("NetworkPolicy"))
    job, created = await kube.create(objects.job)
    if created:
        log.info("created trainer Job %s/%s", ftj.metadata.namespace, job["metadata"]["name"])
        crash_point(crashpoints.created("Job"))
    return job


async def _reconcile(raw: dict, ftj: FineTuneJob, settings: OperatorSettings, state: JobState) -> str:
    """One pass for a live job; returns the phase it wrote."""
    ns = ftj.metadata.namespace
    job_name = naming.trainer_name(ftj)
    job = await kube.get("Job", ns, job_name)
    if job is None:
        try:
            # Destinations are exclusive: another job's files are never written (destinations.py).
            in_use = destinations.conflict(raw, await kube.list_("FineTuneJob", ns))
            if in_use:
                return await _fail(raw, ftj, "DestinationInUse", in_use, settings)
            job = await _ensure_children(ftj, settings)
        except (UnsupportedSource, ValidationError, ValueError, kube.Rejected) as exc:
            return await _fail(raw, ftj, "InvalidSpec", str(exc), settings)
        except NameTaken as exc:
            return await _fail(raw, ftj, "NameConflict", str(exc), settings)
        except MissingInputs as exc:
            return await _wait_for_inputs(raw, ftj, str(exc), settings)
        except kube.NotServed as exc:  # a 404 on create: the resource type is not installed
            return await _fail(raw, ftj, "ConfigError", provisioning.api_missing(exc.kind, exc.api_version) or str(exc), settings)
    if not naming.controlled_by(job, ftj.metadata.uid):
        return await _fail(raw, ftj, "NameConflict", f"a Job named {job_name} exists and belongs to something else", settings)
    if not status.job_finished(job):
        try:
            await _sync_job(ftj, job, provisioning.build_node_pool(ftj, settings), settings)
        except kube.NotServed as exc:  # resumed after Karpenter's CRDs went away
            return await _fail(raw, ftj, "ConfigError", provisioning.api_missing(exc.kind, exc.api_version) or str(exc),
                               settings, job_name)
    pods = await kube.list_("Pod", ns, {"batch.kubernetes.io/controller-uid": job["metadata"]["uid"]})
    _count_retries(pods, state.counted_failures)
    if ftj.spec.distributed.nodes > 1 and not status.job_finished(job):
        for pod in status.stale_gang_members(pods):
            log.info("restarting the attempt of %s/%s: deleting pod %s, whose peer failed", ns, ftj.metadata.name, pod)
            await kube.delete("Pod", ns, pod)
    prov = None
    if provisioning.provisioner_of(ftj, settings) == "karpenter":
        events = await _karpenter_events(ftj, pods)
        prov = status.Provisioning(events, settings.provisioning_timeout_seconds,
                                   await _pool_ready_since(ftj) if events else None)
    mounts = failures.Mounts(settings.mount_timeout_seconds, await _mount_events(ftj, pods, settings))
    obs = status.observe(ftj, job, pods, prov, mounts=mounts)
    if obs.phase == "Succeeded" and obs.result is not None:
        try:
            conflict = await _publish_model(ftj, obs, settings)
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


async def _karpenter_events(ftj: FineTuneJob, pods: list[dict]) -> tuple[status.KarpenterEvent, ...]:
    """Karpenter's words about this job: its events on the job's own trainer pods.

    Only events in the job's namespace about its current pods (by UID) count. Events about the
    cluster-scoped NodePool land in `default`, where anyone who may create events there could
    write one that fails another namespace's job, so they are not read."""
    found = []
    for pod in pods:
        uid = pod["metadata"].get("uid")
        found += [(e, pod) for e in await kube.list_("Event", ftj.metadata.namespace, fields={
            "involvedObject.kind": "Pod", "involvedObject.name": pod["metadata"]["name"]})
            if e.get("involvedObject", {}).get("uid") == uid]
    found = [(e, pod) for e, pod in found
             if (e.get("source", {}).get("component") or e.get("reportingComponent") or "").startswith("karpenter")]
    found.sort(key=lambda pair: pair[0].get("lastTimestamp") or pair[0].get("eventTime") or "")
    return tuple(status.KarpenterEvent(e.get("reason", ""), e.get("message", ""),
                                       parse_time(e.get("lastTimestamp") or e.get("eventTime")),
                                       parse_time(pod["metadata"].get("creationTimestamp")))
                 for e, pod in found)


async def _pool_ready_since(ftj: FineTuneJob) -> datetime | None:
    """When the job's own NodePool turned Ready (Karpenter's condition), or None while it is not."""
    pool = await kube.get("NodePool", None, provisioning.node_pool_name(ftj))
    if not pool or pool["metadata"].get("labels", {}).get(provisioning.JOB_UID_LABEL) != ftj.metadata.uid:
        return None
    ready = status.true_condition(pool, "Ready")
    return parse_time(ready.get("lastTransitionTime")) if ready else None


async def _mount_events(ftj: FineTuneJob, pods: list[dict], settings: OperatorSettings) -> dict[str, str]:
    """The kubelet's FailedMount messages (pod uid -> message) for the job's own pods that have
    waited for their volumes past the mount timeout; no reads at all otherwise."""
    found = []
    for pod in failures.waiting_for_mounts(pods, datetime.now(timezone.utc), settings.mount_timeout_seconds):
        found += await kube.list_("Event", ftj.metadata.namespace, fields={
            "involvedObject.kind": "Pod", "involvedObject.name": pod["metadata"]["name"], "reason": "FailedMount"})
    return failures.mount_messages(pods, found)


async def _publish_model(ftj: FineTuneJob, obs: status.Observation, settings: OperatorSettings) -> str | None:
    """Create the Model (once) and mark it Ready. Returns a message if the name is taken."""
    built = build_model(ftj, obs.result)
    model, created = await kube.create(built)
    if not published_here(model, built, ftj):
        return (f"a Model named {ftj.model_name} already exists and was not published by this job; "
                "set spec.output.modelName to publish under another name")
    if created:
        crashpoints.reached(settings, crashpoints.created("Model"), ftj.metadata.namespace, ftj.metadata.name)
    await kube.patch_status("Model", ftj.metadata.namespace, ftj.model_name,
                            model_status(obs.result, model["metadata"].get("generation")))
    return None
