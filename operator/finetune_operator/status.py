"""Derive a FineTuneJob's status from what the cluster shows: the trainer Job and its pods.

Pure functions: given the same objects they give the same answer, so the operator can call them
from any event, after any restart, as often as it likes (level-triggered, never edge-triggered).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from finetune_trainer.result import InvalidResult, TrainerResult, World, parse_result

from . import failures, naming
from .api import Condition, FineTuneJob, Phase
from .kubetime import format_time, parse_time
from .provisioning import node_pool_name
from .spec_terms import in_spec_terms

CONDITION_TYPES = ("Ready", "Provisioned", "Running", "Succeeded", "Failed")


@dataclass
class Observation:
    """What the status should say, before it is merged into the existing conditions."""

    phase: Phase
    reason: str
    message: str
    running: bool = False
    result: TrainerResult | None = None
    start_time: str | None = None
    completion_time: str | None = None


def true_condition(obj: dict, kind: str) -> dict | None:
    """The object's condition of this type when it is True (a Job's Complete, a NodePool's Ready)."""
    for cond in obj.get("status", {}).get("conditions", []) or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def job_finished(job: dict) -> bool:
    return bool(true_condition(job, "Complete") or true_condition(job, "Failed"))


def must_stop_trainer(phase: str, job: dict | None, owner_uid: str) -> bool:
    """Whether the operator must delete the trainer Job: the FineTuneJob failed while its own
    trainer Job is still live.

    The Job controller ends a trainer Job itself only for the failures it sees: backoffLimit,
    activeDeadlineSeconds and the FailJob rules of its pod failure policy (failures.RULES); the
    Job is finished then. Every other failure is the operator's decision (failures.fatal_problem:
    out of memory, an image that cannot be pulled, a missing ConfigMap or Secret, bad input
    reported only in a termination message; no instance type, a provisioning timeout): the Job
    controller would retry those pods or leave them waiting forever. A Job that belongs to
    something else (NameConflict) is never touched."""
    if phase != "Failed" or job is None or job_finished(job) or job["metadata"].get("deletionTimestamp"):
        return False
    return any(ref.get("uid") == owner_uid for ref in job["metadata"].get("ownerReferences", []) or [])


def _by_index(pods: list[dict]) -> list[dict]:
    def index(pod: dict) -> int:
        value = pod.get("metadata", {}).get("annotations", {}).get(naming.COMPLETION_INDEX, "0")
        return int(value) if value.isdigit() else 0

    return sorted(pods, key=lambda p: (index(p), p.get("metadata", {}).get("creationTimestamp", "")))


def stale_gang_members(pods: list[dict]) -> list[str]:
    """Pods of a multi-node attempt that must go because a peer of theirs failed.

    torchrun cannot carry on with a member missing, so one failed pod ends the whole attempt: the
    live pods created before the latest failure are deleted, the Job controller recreates every
    index, and the new attempt resumes from the latest checkpoint together."""
    finished = [(failures.terminated(p) or {}).get("finishedAt") or p["metadata"].get("creationTimestamp", "")
                for p in pods if p.get("status", {}).get("phase") == "Failed"]
    if not finished:
        return []
    latest_failure = max(finished)
    return [p["metadata"]["name"] for p in pods
            if p.get("status", {}).get("phase") in ("Pending", "Running")
            and not p["metadata"].get("deletionTimestamp")
            and p["metadata"].get("creationTimestamp", "") <= latest_failure]


def _pending_message(pods: list[dict]) -> str:
    for pod in pods:
        for cond in pod.get("status", {}).get("conditions", []) or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                return f"pod {pod['metadata']['name']} is not scheduled: {cond.get('message', cond.get('reason', ''))}"
    for pod in pods:
        waiting = failures.waiting_state(pod) if pod.get("status", {}).get("phase") == "Pending" else None
        if waiting and waiting.get("reason"):
            message = f": {waiting['message']}" if waiting.get("message") else ""
            return f"pod {pod['metadata']['name']} is waiting to start ({waiting['reason']}){message}"
    return "waiting for the trainer pods to start"


def asked_world(ftj: FineTuneJob) -> World:
    """The process group the job asks for: distributed.nodes pods of processes_per_node processes
    each (the numbers the trainer command hands torchrun)."""
    nodes, per_node = ftj.spec.distributed.nodes, ftj.spec.processes_per_node
    return World(world_size=nodes * per_node, nodes=nodes, processes_per_node=per_node)


def world_mismatch(ftj: FineTuneJob, joined: World) -> str | None:
    """Why the world the trainer reports joining is not the one the job asked for, if it is not.

    A launcher that ignores torchrun's environment makes every pod train its own world-size-1
    copy, and each one exits 0 with a result; only the world it measured tells."""
    asked = asked_world(ftj)
    if joined == asked:
        return None
    return (f"trainer joined {joined.describe()}; the job asked for {asked.nodes} node(s) x "
            f"{asked.processes_per_node} = {asked.world_size}; no Model was published")


NO_INSTANCE_TYPE = ("no instance type satisf", "filtered out all available instance types")
# Karpenter's refusals that can only be another NodePool's: its taints (the job's pod tolerates its
# own pool's only taint) and its pool label (the pod selects its own pool by label). Refusals over
# limits name their pool.
OTHER_POOL_REFUSAL = re.compile(r"did not tolerate taint \(taint=[^)]*\)"
                                r"|incompatible requirements, key karpenter\.sh/nodepool, .*")
NAMED_POOL = re.compile(r"\(NodePool=([^)]*)\)")


@dataclass(frozen=True)
class KarpenterEvent:
    """One of Karpenter's events on the job's trainer pod."""

    reason: str
    message: str
    at: datetime | None = None  # when Karpenter last said it (the event's lastTimestamp)
    pod_created: datetime | None = None  # the creationTimestamp of the pod it is about

    @property
    def refusals(self) -> list[str]:
        """A FailedScheduling message joins one refusal per NodePool Karpenter tried, with "; "."""
        body = self.message.removeprefix("Failed to schedule pod,")
        return [part.strip() for part in body.split("; ") if part.strip()]


@dataclass(frozen=True)
class Provisioning:
    """What the operator knows about node provisioning for the job (karpenter only)."""

    events: tuple[KarpenterEvent, ...] = ()  # newest last
    timeout_seconds: float = 900
    pool_ready_since: datetime | None = None  # the job's NodePool's Ready condition turned True


def _another_pools(refusal: str, own_pool: str) -> bool:
    named = NAMED_POOL.search(refusal)
    return named.group(1) != own_pool if named else bool(OTHER_POOL_REFUSAL.fullmatch(refusal))


def pool_left_out(event: KarpenterEvent, own_pool: str, pool_ready_since: datetime | None) -> bool:
    """Whether Karpenter scheduled the pod without considering the job's own NodePool although it
    was Ready: Karpenter skips a Ready pool only when its requirements match no instance type.

    Karpenter names a pool it skipped nowhere in the pod's message; it says so in a NodePool event,
    but that lands in `default`, where it could be forged, and is not read. So: every refusal is
    another pool's, and Karpenter tried the pod after the pool was Ready (a pool not yet Ready is
    skipped too). Timestamps have whole seconds, so "after" is either the event in a later second
    than the readiness, or the pod created no earlier than the readiness's second: Karpenter
    schedules a pod only once no new pod has come for its batch idle time (1 s by default), so
    then it tried the pod after the readiness. Anything else is inconclusive and waits for the
    provisioning timeout (Karpenter repeats an event for a pod only after 5 minutes)."""
    if event.reason != "FailedScheduling" or pool_ready_since is None:
        return False
    ready = pool_ready_since.replace(microsecond=0)
    event_later = event.at is not None and event.at.replace(microsecond=0) > ready
    pod_later = event.pod_created is not None and event.pod_created.replace(microsecond=0) >= ready
    if not (event_later or pod_later):
        return False
    return bool(event.refusals) and all(_another_pools(part, own_pool) for part in event.refusals)


def _provisioning(ftj: FineTuneJob, job: dict, pods: list[dict], info: Provisioning, now: datetime) -> Observation:
    """Trainer pods wait for Karpenter: say what is happening, or fail when it cannot happen."""
    start_time = job.get("status", {}).get("startTime")
    own_pool = node_pool_name(ftj)
    for event in reversed(info.events):
        if any(words in event.message for words in NO_INSTANCE_TYPE) or pool_left_out(event, own_pool, info.pool_ready_since):
            return Observation("Failed", "NoInstanceType",
                               f"no instance type satisfies the request ({_request_summary(ftj)}): {event.message}",
                               start_time=start_time, completion_time=format_time(now))
    waited = (now - (parse_time(job["metadata"].get("creationTimestamp")) or now)).total_seconds()
    if waited > info.timeout_seconds:
        last = info.events[-1].message if info.events else _pending_message(pods)
        return Observation("Failed", "ProvisioningTimeout",
                           f"trainer pods not scheduled after {int(waited)}s: {last}",
                           start_time=start_time, completion_time=format_time(now))
    for event in reversed(info.events):
        own_limit = [part for part in event.refusals if "limits" in part and not _another_pools(part, own_pool)]
        if own_limit:
            return Observation("Provisioning", "NodePoolLimitReached", "; ".join(own_limit), start_time=start_time)
    latest = info.events[-1].message if info.events else _pending_message(pods)
    return Observation("Provisioning", "WaitingForCapacity", latest, start_time=start_time)


def _request_summary(ftj: FineTuneJob) -> str:
    res = ftj.spec.resources
    parts = [f"{ftj.spec.distributed.nodes} node(s)", f"cpu {res.cpu}", f"memory {res.memory}"]
    if res.accelerator != "none":
        parts.append(f"{res.accelerators_per_node} {res.accelerator}")
    if res.instance_type:
        parts.append(f"instance type {res.instance_type}")
    return ", ".join(parts)


def observe(ftj: FineTuneJob, job: dict | None, pods: list[dict], provisioning: Provisioning | None = None,
            now: datetime | None = None, mounts: failures.Mounts | None = None) -> Observation:
    """What the trainer Job and its pods (and, for Karpenter pools, its events; for pods that wait
    for their volumes, the kubelet's FailedMount events and the mount timeout) say about the job."""
    now = now or datetime.now(timezone.utc)
    if job is None:
        return Observation("Pending", "Creating", "creating the trainer Job")
    status = job.get("status", {})
    start_time = status.get("startTime")

    complete = true_condition(job, "Complete")
    if complete:
        completion = status.get("completionTime") or complete.get("lastTransitionTime")
        rank0 = [p for p in _by_index(pods) if p.get("status", {}).get("phase") == "Succeeded"]
        if not rank0:
            return Observation("Failed", "NoResult", "the trainer Job completed but its pods are gone, so no result can be read",
                               start_time=start_time, completion_time=completion)
        term = failures.terminated(rank0[0]) or {}
        try:
            result = parse_result(term.get("message"))
        except InvalidResult as exc:
            return Observation("Failed", "NoResult" if not term.get("message") else "InvalidResult", str(exc),
                               start_time=start_time, completion_time=completion)
        mismatch = world_mismatch(ftj, result.world)
        if mismatch:
            return Observation("Failed", "WorldSizeMismatch", mismatch, start_time=start_time, completion_time=completion)
        m = result.metrics
        message = f"trained {m.steps} steps; train loss {m.train_loss:.4g}"
        if m.eval_loss is not None:
            message += f", eval loss {m.eval_loss:.4g}"
        return Observation("Succeeded", "Completed", message, result=result, start_time=start_time, completion_time=completion)

    failed = true_condition(job, "Failed")
    if failed:
        failure = failures.job_failure(failed, pods)
        return Observation("Failed", failure.reason, in_spec_terms(failure.message, ftj), start_time=start_time,
                           completion_time=failed.get("lastTransitionTime"))
    fatal = failures.fatal_problem(pods, now, mounts)
    if fatal:
        return Observation("Failed", fatal.reason, fatal.message, start_time=start_time,
                           completion_time=format_time(now))

    if ftj.spec.suspend:
        live = [p for p in pods if p.get("status", {}).get("phase") in ("Pending", "Running")]
        if job.get("spec", {}).get("suspend") and not live:
            return Observation("Suspended", "Suspended", "suspended; set spec.suspend to false to resume from the latest checkpoint",
                               start_time=start_time)
        return Observation("Suspended", "Suspending", "stopping the trainer after it saves a checkpoint",
                           start_time=start_time)

    running = [p for p in pods if p.get("status", {}).get("phase") == "Running"]
    finished = [p for p in pods if p.get("status", {}).get("phase") == "Succeeded"]
    # A pod that finished has run: between the trainer's exit and the Job controller's Complete
    # condition (and while one rank exits before another) the job is still Running, never
    # back to Pending.
    if (running or finished) and len(running) + len(finished) >= ftj.spec.distributed.nodes:
        if not running:
            return Observation("Running", "TrainerFinished", "the trainer finished; waiting for its Job to complete",
                               running=True, start_time=start_time)
        retries = status.get("failed", 0)
        message = f"{len(running)} trainer pod(s) running"
        if retries:
            message += f" after {retries} failed attempt(s)"
        return Observation("Running", "TrainerRunning", message, running=True, start_time=start_time)
    unscheduled = not pods or any(not p.get("spec", {}).get("nodeName") for p in pods)
    if provisioning is not None and unscheduled:
        return _provisioning(ftj, job, pods, provisioning, now)
    return Observation("Pending", "WaitingForPods", _pending_message(pods), start_time=start_time)


# A condition's message as written: an API server's answer or a pod's message can be long, and
# a status nobody can read (or that the CRD's bound refuses) helps no one.
MAX_CONDITION_MESSAGE = 4096


def bounded(message: str) -> str:
    return message if len(message) <= MAX_CONDITION_MESSAGE else message[:MAX_CONDITION_MESSAGE - 1] + "…"


def _condition(kind: str, truth: bool, reason: str, message: str, generation: int | None,
               previous: dict[str, Condition], now: datetime) -> Condition:
    status = "True" if truth else "False"
    old = previous.get(kind)
    # lastTransitionTime moves only when status flips, per the API conventions.
    since = old.last_transition_time if old and old.status == status else now
    return Condition(type=kind, status=status, reason=reason, message=bounded(message),
                     last_transition_time=since, observed_generation=generation)


def invalid_spec_patch(raw: dict[str, Any], message: str, now: datetime | None = None) -> dict[str, Any]:
    """The status of a FineTuneJob the operator cannot parse at all: Failed/InvalidSpec, built from
    the raw object alone (there is no FineTuneJob to derive conditions from)."""
    now = (now or datetime.now(timezone.utc)).replace(microsecond=0)
    generation = raw["metadata"].get("generation")
    conditions = [Condition(type=kind, status="True" if kind == "Failed" else "False", reason="InvalidSpec",
                            message=bounded(message), last_transition_time=now, observed_generation=generation)
                  for kind in ("Ready", "Provisioned", "Running", "Succeeded", "Failed")]
    return {"phase": "Failed", "observedGeneration": generation, "completionTime": format_time(now),
            "conditions": [c.model_dump(by_alias=True, exclude_none=True, mode="json") for c in conditions]}


def conditions_for(obs: Observation, ftj: FineTuneJob, now: datetime | None = None) -> list[Condition]:
    now = (now or datetime.now(timezone.utc)).replace(microsecond=0)
    gen = ftj.metadata.generation
    previous = {c.type: c for c in ftj.status.conditions}
    done = obs.phase in ("Succeeded", "Failed")
    started = obs.running or done and obs.start_time is not None
    return [
        _condition("Ready", obs.phase == "Succeeded", obs.reason, obs.message, gen, previous, now),
        _condition("Provisioned", obs.running or started or obs.phase == "Running",
                   "PodsScheduled" if started else obs.reason, "" if started else obs.message, gen, previous, now),
        _condition("Running", obs.phase == "Running", obs.reason, obs.message, gen, previous, now),
        _condition("Succeeded", obs.phase == "Succeeded", obs.reason, obs.message, gen, previous, now),
        _condition("Failed", obs.phase == "Failed", obs.reason, obs.message, gen, previous, now),
    ]


def status_patch(obs: Observation, ftj: FineTuneJob, trainer_job: str | None, now: datetime | None = None) -> dict[str, Any]:
    """The status subresource patch for an observation."""
    patch: dict[str, Any] = {
        "phase": obs.phase,
        "conditions": [c.model_dump(by_alias=True, exclude_none=True, mode="json") for c in conditions_for(obs, ftj, now)],
        "observedGeneration": ftj.metadata.generation,
        "trainerJob": trainer_job,
    }
    # startTime: when the trainer first ran (not when the Job was created), kept across retries.
    now = (now or datetime.now(timezone.utc)).replace(microsecond=0)
    if ftj.status.start_time is None and obs.running:
        patch["startTime"] = format_time(now)
    if obs.completion_time:
        patch["completionTime"] = obs.completion_time
    if obs.phase == "Succeeded":
        patch["model"] = ftj.model_name
        m = obs.result.metrics if obs.result else None
        if m:
            patch["progress"] = {"step": m.steps, "totalSteps": m.steps, "percent": 100, "loss": m.train_loss, "eta": "0s"}
            plan = obs.result.run_plan
            if plan and plan.global_batch_size is not None:
                patch["progress"]["globalBatchSize"] = plan.global_batch_size
            if plan and plan.epochs is not None:
                patch["progress"]["epochs"] = plan.epochs
    return patch


def _normal_conditions(conditions: Any) -> Any:
    """Conditions as status_patch writes them, so equal ones compare equal whatever their spelling."""
    try:
        return [Condition.model_validate(c).model_dump(by_alias=True, exclude_none=True, mode="json") for c in conditions]
    except (TypeError, ValueError):
        return conditions


def _changes(patch: Any, current: Any) -> bool:
    """Whether applying `patch` as a JSON merge patch (RFC 7386) to `current` changes it."""
    if not isinstance(patch, dict):
        return patch != current
    current = current if isinstance(current, dict) else {}
    for key, value in patch.items():
        if value is None:
            if current.get(key) is not None:
                return True
        elif isinstance(value, dict):
            if not isinstance(current.get(key), dict) or _changes(value, current[key]):
                return True
        elif value != current.get(key):
            return True
    return False


def patch_changes(patch: dict[str, Any], current: dict[str, Any] | None) -> bool:
    """Whether the status patch would change the status there is: reconcile writes only then.

    Every field the patch carries counts (phase, each condition with its reason, message,
    lastTransitionTime and observedGeneration, the times, the model, progress); fields the patch
    does not carry are someone else's (progress, between two writes) and are left out."""
    current = dict(current or {})
    if isinstance(current.get("conditions"), list):
        current["conditions"] = _normal_conditions(current["conditions"])
    return _changes(patch, current)
