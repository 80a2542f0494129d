"""Why a trainer pod failed, and whether trying again can help.

Retryable failures (a lost node, an eviction, a preemption, a crash) are left to the Job
controller, which retries with exponential backoff up to backoffLimit; the trainer resumes from
its latest checkpoint. Failures that a retry cannot fix end the job at once, with advice:
bad config or data (exit code 2, through the Job's pod failure policy), out of memory, an image
that cannot be pulled, a missing ConfigMap or Secret.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from finetune_trainer.protocol import EXIT_PREEMPTED, EXIT_USER_ERROR

from .kubetime import parse_time

# How long an image pull or container config error may persist before the job fails: long
# enough to ride out a registry hiccup, short enough not to hold nodes for nothing.
STUCK_SECONDS = 120

_DISRUPTION_REASONS = {"DeletionByPodGC", "NodeLost", "Evicted", "TerminationByKubelet", "PreemptionByScheduler",
                       "DeletionByTaintManager", "EvictionByEvictionAPI"}


@dataclass(frozen=True)
class Failure:
    reason: str
    message: str
    retryable: bool


def terminated(pod: dict) -> dict | None:
    """The trainer container's terminated state (current, or the last one)."""
    for status in pod.get("status", {}).get("containerStatuses", []) or []:
        if status.get("name") == "trainer":
            return status.get("state", {}).get("terminated") or status.get("lastState", {}).get("terminated")
    return None


def _waiting(pod: dict) -> dict | None:
    for status in pod.get("status", {}).get("containerStatuses", []) or []:
        if status.get("name") == "trainer":
            return status.get("state", {}).get("waiting")
    return None


def _reported(term: dict) -> tuple[int | None, str]:
    """Exit code and message, preferring what the trainer wrote to its termination message:
    under torchrun the container's own exit code is 1 whatever the trainer exited with."""
    code, text = term.get("exitCode"), (term.get("message") or "").strip()
    if text.startswith("{"):
        try:
            reported = json.loads(text)
        except json.JSONDecodeError:
            return code, text
        if isinstance(reported, dict) and "error" in reported:
            return reported.get("exitCode", code), str(reported["error"])
    return code, text


def classify(pod: dict) -> Failure:
    """Classify one failed trainer pod."""
    name = pod["metadata"]["name"]
    term = terminated(pod) or {}
    code, text = _reported(term)
    reason = term.get("reason") or ""
    detail = f"pod {name}: exit code {code} ({reason or 'Error'})" + (f": {text[:2000]}" if text else "")
    disruption = next((c for c in pod.get("status", {}).get("conditions", []) or []
                       if c.get("type") == "DisruptionTarget" and c.get("status") == "True"), None)
    if disruption or pod.get("status", {}).get("reason") in _DISRUPTION_REASONS:
        why = (disruption or {}).get("reason") or pod["status"].get("reason")
        return Failure("NodeLost" if why in ("DeletionByPodGC", "NodeLost", "DeletionByTaintManager") else "Evicted",
                       f"pod {name} was disrupted ({why}); the retry resumes from the latest checkpoint", True)
    if code == EXIT_USER_ERROR:
        return Failure("InvalidInput", f"bad configuration or data, retrying cannot help: {detail}", False)
    if reason == "OOMKilled" or "out of memory" in text.lower():
        return Failure("OutOfMemory", f"{detail}. Lower training.microBatchSize or maxSeqLength, enable "
                       "training.gradientCheckpointing (true: every layer), use distributed.offload, or request more memory", False)
    if code == EXIT_PREEMPTED:
        return Failure("Preempted", f"{detail}; the trainer checkpointed on SIGTERM and the retry resumes", True)
    return Failure("TrainerError", detail, True)


def latest_failure(pods: list[dict]) -> Failure | None:
    failed = [p for p in pods if p.get("status", {}).get("phase") == "Failed"]
    failed.sort(key=lambda p: (terminated(p) or {}).get("finishedAt") or p["metadata"].get("creationTimestamp", ""))
    return classify(failed[-1]) if failed else None


def fatal_problem(pods: list[dict], now: datetime) -> Failure | None:
    """A failure the Job controller would retry (or wait on) forever in vain."""
    for pod in pods:
        phase = pod.get("status", {}).get("phase")
        if phase == "Failed":
            failure = classify(pod)
            # InvalidInput with the container exiting 2 is the pod failure policy's to end; under
            # torchrun (exit 1) only the termination message tells, so the operator ends it.
            if not failure.retryable and not (failure.reason == "InvalidInput" and
                                              (terminated(pod) or {}).get("exitCode") == EXIT_USER_ERROR):
                return failure
        waiting = _waiting(pod) if phase == "Pending" else None
        if not waiting:
            continue
        why, text = waiting.get("reason", ""), waiting.get("message", "")
        created = pod["metadata"].get("creationTimestamp")
        age = (now - parse_time(created)).total_seconds() if created else 0
        if why in ("InvalidImageName", "ErrImageNeverPull") or (why in ("ErrImagePull", "ImagePullBackOff") and age > STUCK_SECONDS):
            return Failure("ImagePullFailed", f"pod {pod['metadata']['name']} cannot pull its image ({why}): {text}", False)
        if why == "CreateContainerConfigError" and age > STUCK_SECONDS:
            return Failure("ConfigError", f"pod {pod['metadata']['name']} cannot start: {text}", False)
    return None


def job_failure(job_condition: dict, pods: list[dict]) -> Failure:
    """The FineTuneJob's failure once the trainer Job itself has failed."""
    job_reason = job_condition.get("reason") or "TrainerFailed"
    last = latest_failure(pods)
    if job_reason == "DeadlineExceeded":
        return Failure("DeadlineExceeded", f"the job ran longer than spec.activeDeadlineSeconds: "
                       f"{job_condition.get('message', '')}", False)
    if job_reason == "PodFailurePolicy" and last is not None:
        return last
    message = job_condition.get("message") or "the trainer Job failed"
    if last is not None:
        message = f"{message}; last failure: {last.reason}: {last.message}"
    return Failure(job_reason, message, False)
