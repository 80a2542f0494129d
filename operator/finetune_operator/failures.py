"""Why a trainer pod failed, and whether trying again can help: one table, `RULES`.

Each rule names one signal the cluster shows (the trainer's exit code, a pod condition, the
container's terminated or waiting reason, the trainer Job's own failure reason), the
FineTuneJob reason it becomes, whether a retry can help, the message the user reads, and what the
Job controller does about it. The same table is rendered into the trainer Job's
`podFailurePolicy` (`pod_failure_policy`) and read by `classify`, so the two processes that act on
a failure, the Job controller and the operator, cannot disagree about it.

Retryable failures (a lost node, an eviction, a preemption, a crash) are left to the Job
controller, which retries with exponential backoff up to backoffLimit; the trainer resumes from
its latest checkpoint. Failures that a retry cannot fix end the job at once, with advice. The
Job controller ends the Job itself for those it can see (an exit code its pod failure policy
names); the operator decides the others (`operator_decides`), and then stops the trainer Job,
which would otherwise retry them or wait on them forever.

A trainer Job that completed is judged by its result instead (status.observe): `NoResult`,
`InvalidResult`, and `WorldSizeMismatch` when the world the trainer joined is not the one the job
asked for (status.world_mismatch). None is retried, and none publishes a Model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from finetune_trainer import protocol
from finetune_trainer.protocol import EXIT_DESTINATION_IN_USE, EXIT_PREEMPTED, EXIT_USER_ERROR

from .kubetime import parse_time
from .naming import TRAINER_CONTAINER


# How long an image pull or container config error may persist before the job fails: long
# enough to ride out a registry hiccup, short enough not to hold nodes for nothing.
STUCK_SECONDS = 120

# How long a scheduled pod may wait for its volumes and env (a Secret, ConfigMap or claim that
# is missing, or a mount that fails) before the job fails; the default of
# settings.mount_timeout_seconds. Counted from scheduling, so time spent waiting for a node
# does not count.
MOUNT_TIMEOUT_SECONDS = 300.0

# The kubelet's container waiting reasons while volumes or env cannot be set up. Either may heal
# (the user creates the Secret, or the key), so both fail the job only after the mount timeout.
MOUNT_WAITING_REASONS = ("ContainerCreating", "CreateContainerConfigError")

# pod.status.reason values that mean the pod was disrupted, on clusters whose kubelet or
# controllers do not (yet) set the DisruptionTarget condition.
DISRUPTION_REASONS = ("DeletionByPodGC", "NodeLost", "Evicted", "TerminationByKubelet", "PreemptionByScheduler",
                      "DeletionByTaintManager", "EvictionByEvictionAPI")


@dataclass(frozen=True)
class Rule:
    """One failure signal and what it means.

    A rule matches when any one of its signals shows; a rule of a failed pod with no signal at
    all matches every failed pod (the last rule: TrainerError). The first matching rule wins, so
    the order of `RULES` is the precedence: a disrupted pod is a disruption whatever it exited
    with. `message` is a str.format template over {pod} (the pod's name), {detail} (exit code,
    container reason and termination message), {why} (the disruption or waiting reason) and
    {text} (the termination, waiting or Job condition message alone).
    """

    reason: str  # the FineTuneJob's condition reason
    retryable: bool
    message: str
    # A failed pod: the trainer's exit code (as it reported it), the container's terminated
    # reason, words in its termination message, or a pod condition ...
    exit_codes: tuple[int, ...] = ()
    container_reasons: tuple[str, ...] = ()
    message_contains: tuple[str, ...] = ()  # lowercase
    pod_condition: str | None = None
    disruption_reasons: tuple[str, ...] = ()  # ... of the condition's (or the pod's) reason; any when empty
    # A pending pod whose container waits for one of these reasons, for at least stuck_seconds.
    waiting_reasons: tuple[str, ...] = ()
    stuck_seconds: float = 0
    # ... or, instead, for the operator's mount timeout since the pod was scheduled (Mounts).
    after_mount_timeout: bool = False
    # The trainer Job failed with one of these reasons (its Failed condition).
    job_reasons: tuple[str, ...] = ()
    # What the Job controller does, rendered into the Job's podFailurePolicy; None: it counts the
    # failed pod against backoffLimit (the default).
    job_action: Literal["FailJob", "Ignore"] | None = None

    @property
    def kind(self) -> Literal["failed", "waiting", "job"]:
        return "job" if self.job_reasons else "waiting" if self.waiting_reasons else "failed"

    def policy_rule(self, container: str) -> dict | None:
        """This rule as a podFailurePolicy rule, if the Job controller acts on it."""
        if self.job_action is None:
            return None
        if self.exit_codes:
            return {"action": self.job_action,
                    "onExitCodes": {"containerName": container, "operator": "In", "values": sorted(self.exit_codes)}}
        if self.pod_condition:
            return {"action": self.job_action, "onPodConditions": [{"type": self.pod_condition}]}
        raise ValueError(f"rule {self.reason}: a Job action needs an exit code or a pod condition")


_ON_RETRY = "the retry resumes from the latest checkpoint"

RULES: tuple[Rule, ...] = (
    # Preemption, eviction and node loss are not the trainer's fault: the Job controller does not
    # count them against backoffLimit. (It sees only the condition, not its reason.)
    Rule("NodeLost", True, "pod {pod} was disrupted ({why}); " + _ON_RETRY, pod_condition="DisruptionTarget",
         disruption_reasons=("DeletionByPodGC", "NodeLost", "DeletionByTaintManager"), job_action="Ignore"),
    Rule("Evicted", True, "pod {pod} was disrupted ({why}); " + _ON_RETRY, pod_condition="DisruptionTarget",
         job_action="Ignore"),
    # Bad config or bad data: fail the whole Job at once instead of burning the backoff limit.
    # Under torchrun the container exits 1 whatever the trainer exited with; then only the
    # termination message tells, and the operator ends the Job (see operator_decides).
    # output.dir belongs to another job (its owner file, finetune_trainer.ownership): nothing was
    # written, and no retry can change whose it is.
    Rule("DestinationInUse", False, "{detail}", exit_codes=(EXIT_DESTINATION_IN_USE,), job_action="FailJob"),
    Rule("InvalidInput", False, "bad configuration or data, retrying cannot help: {detail}",
         exit_codes=(EXIT_USER_ERROR,), job_action="FailJob"),
    # Exit 137 is also a plain SIGKILL, so the Job controller cannot tell OOM apart: the operator does.
    Rule("OutOfMemory", False, "{detail}. Lower spec.training.microBatchSize or maxSeqLength, enable "
         "spec.training.gradientCheckpointing (true: every layer), use spec.distributed.offload, or request more "
         "memory (spec.resources.memory)",
         container_reasons=("OOMKilled",), message_contains=("out of memory",)),
    Rule("Preempted", True, "{detail}; the trainer checkpointed on SIGTERM and the retry resumes",
         exit_codes=(EXIT_PREEMPTED,)),
    Rule("TrainerError", True, "{detail}"),
    # Pending pods that will never start; the Job controller would wait on them forever.
    Rule("ImagePullFailed", False, "pod {pod} cannot pull its image ({why}): {text}",
         waiting_reasons=("InvalidImageName", "ErrImageNeverPull")),
    Rule("ImagePullFailed", False, "pod {pod} cannot pull its image ({why}): {text}",
         waiting_reasons=("ErrImagePull", "ImagePullBackOff"), stuck_seconds=STUCK_SECONDS),
    # Volumes or env that cannot be set up: a missing Secret, ConfigMap, key or claim, a mount
    # that fails. {text} is the kubelet's word: the waiting message, else its FailedMount event.
    Rule("ConfigError", False, "pod {pod} cannot start: {text}",
         waiting_reasons=MOUNT_WAITING_REASONS, after_mount_timeout=True),
    # The Job controller's own decisions.
    Rule("DeadlineExceeded", False, "the job ran longer than spec.activeDeadlineSeconds: {text}",
         job_reasons=("DeadlineExceeded",)),
)


@dataclass(frozen=True)
class Failure:
    reason: str
    message: str
    retryable: bool


@dataclass(frozen=True)
class Mounts:
    """What the operator knows about the job's pods that wait for their volumes and env."""

    timeout_seconds: float = MOUNT_TIMEOUT_SECONDS
    events: Mapping[str, str] = field(default_factory=dict)  # pod uid -> the kubelet's latest FailedMount message


def pod_failure_policy(container: str = TRAINER_CONTAINER, rules: tuple[Rule, ...] = RULES) -> dict:
    """The trainer Job's podFailurePolicy: the rules the Job controller acts on, in table order."""
    rendered: list[dict] = []
    for rule in rules:
        policy = rule.policy_rule(container)
        if policy is not None and policy not in rendered:
            rendered.append(policy)
    return {"rules": rendered}


def terminated(pod: dict) -> dict | None:
    """The trainer container's terminated state (current, or the last one)."""
    for status in pod.get("status", {}).get("containerStatuses", []) or []:
        if status.get("name") == TRAINER_CONTAINER:
            return status.get("state", {}).get("terminated") or status.get("lastState", {}).get("terminated")
    return None


def waiting_state(pod: dict) -> dict | None:
    """The trainer container's waiting state, if it waits."""
    for status in pod.get("status", {}).get("containerStatuses", []) or []:
        if status.get("name") == TRAINER_CONTAINER:
            return status.get("state", {}).get("waiting")
    return None


def _reported(term: dict) -> tuple[int | None, str]:
    """Exit code and message, preferring what the trainer wrote to its termination message:
    under torchrun the container's own exit code is 1 whatever the trainer exited with."""
    code, text = term.get("exitCode"), (term.get("message") or "").strip()
    reported = protocol.parse_failure_message(text)
    if reported is None:
        return code, text
    reported_code, error = reported
    return (code if reported_code is None else reported_code), error


def _disruption(pod: dict) -> str | None:
    """Why the pod was disrupted (the DisruptionTarget condition's reason, or the pod's), if it was."""
    for cond in pod.get("status", {}).get("conditions", []) or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            return cond.get("reason") or "DisruptionTarget"
    why = pod.get("status", {}).get("reason")
    return why if why in DISRUPTION_REASONS else None


def _match_failed(pod: dict, rules: tuple[Rule, ...]) -> tuple[Rule, Failure]:
    name = pod["metadata"]["name"]
    term = terminated(pod) or {}
    code, text = _reported(term)
    container_reason = term.get("reason") or ""
    detail = f"pod {name}: exit code {code} ({container_reason or 'Error'})" + (f": {text[:2000]}" if text else "")
    why = _disruption(pod)
    for rule in rules:
        if rule.kind != "failed":
            continue
        signals = [
            rule.pod_condition is not None and why is not None
            and (not rule.disruption_reasons or why in rule.disruption_reasons),
            code in rule.exit_codes,
            container_reason in rule.container_reasons,
            any(words in text.lower() for words in rule.message_contains),
        ]
        has_signal = rule.pod_condition or rule.exit_codes or rule.container_reasons or rule.message_contains
        if any(signals) or not has_signal:
            return rule, Failure(rule.reason, rule.message.format(pod=name, detail=detail, why=why, text=text),
                                 rule.retryable)
    raise LookupError("the failure rules end with a catch-all")  # pragma: no cover


def classify(pod: dict, rules: tuple[Rule, ...] = RULES) -> Failure:
    """Classify one failed trainer pod."""
    return _match_failed(pod, rules)[1]


def operator_decides(pod: dict, rules: tuple[Rule, ...] = RULES) -> Failure | None:
    """The failure of a failed pod that the operator must act on: one a retry cannot fix and
    that the Job controller does not end by itself, because its pod failure policy does not see
    it (OOM; bad input reported only in the termination message, as under torchrun)."""
    rule, failure = _match_failed(pod, rules)
    if rule.retryable:
        return None
    container_code = (terminated(pod) or {}).get("exitCode")
    seen_by_job = rule.job_action == "FailJob" and container_code in rule.exit_codes
    return None if seen_by_job else failure


def latest_failure(pods: list[dict]) -> Failure | None:
    failed = [p for p in pods if p.get("status", {}).get("phase") == "Failed"]
    failed.sort(key=lambda p: (terminated(p) or {}).get("finishedAt") or p["metadata"].get("creationTimestamp", ""))
    return classify(failed[-1]) if failed else None


def _age(timestamp: str | None, now: datetime) -> float:
    when = parse_time(timestamp) if timestamp else None
    return (now - when).total_seconds() if when else 0.0


def scheduled_since(pod: dict) -> str | None:
    """When the pod was scheduled (its PodScheduled condition turned True), else when it was
    created: a container waiting reason comes from a kubelet, so the pod is on a node."""
    for cond in pod.get("status", {}).get("conditions", []) or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "True" and cond.get("lastTransitionTime"):
            return cond["lastTransitionTime"]
    return pod["metadata"].get("creationTimestamp")


def waiting_for_mounts(pods: list[dict], now: datetime, timeout_seconds: float) -> list[dict]:
    """The pending pods whose container has waited for its volumes or env past the mount timeout:
    the only ones whose FailedMount events the operator reads."""
    found = []
    for pod in pods:
        waiting = waiting_state(pod) if pod.get("status", {}).get("phase") == "Pending" else None
        if waiting and waiting.get("reason") in MOUNT_WAITING_REASONS and _age(scheduled_since(pod), now) > timeout_seconds:
            found.append(pod)
    return found


def mount_messages(pods: list[dict], events: list[dict]) -> dict[str, str]:
    """pod uid -> the message of the kubelet's latest FailedMount event on that pod.

    Only events about these very pods (by UID, so a pod of the same name from another attempt or
    job does not count) and reported by the kubelet count."""
    uids = {p["metadata"].get("uid") for p in pods} - {None}
    found = [e for e in events
             if e.get("reason") == "FailedMount"
             and e.get("involvedObject", {}).get("kind") == "Pod"
             and e.get("involvedObject", {}).get("uid") in uids
             and "kubelet" in (e.get("source", {}).get("component"), e.get("reportingComponent"), e.get("reportingController"))]
    found.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    return {e["involvedObject"]["uid"]: e.get("message") or e.get("note") or "" for e in found}


def stuck(pod: dict, now: datetime, rules: tuple[Rule, ...] = RULES, mounts: Mounts | None = None) -> Failure | None:
    """A pending pod that will never start (an image that cannot be pulled, a missing Secret,
    ConfigMap or claim, a mount that fails)."""
    waiting = waiting_state(pod) if pod.get("status", {}).get("phase") == "Pending" else None
    if not waiting:
        return None
    mounts = mounts or Mounts()
    why, text = waiting.get("reason", ""), waiting.get("message", "")
    age = _age(pod["metadata"].get("creationTimestamp"), now)
    for rule in rules:
        if rule.kind != "waiting" or why not in rule.waiting_reasons:
            continue
        if rule.after_mount_timeout:
            waited = _age(scheduled_since(pod), now)
            if waited <= mounts.timeout_seconds:
                continue
            text = text or mounts.events.get(pod["metadata"].get("uid", ""), "")
            # ContainerCreating also covers pulling the image, which takes many minutes for a
            # large trainer image on a fresh node: only the kubelet's own word that a mount
            # fails (a FailedMount event, or a waiting message) makes it a ConfigError.
            if not text:
                if why == "ContainerCreating":
                    continue
                text = f"its container has waited in {why} for {int(waited)}s since the pod was scheduled"
        elif rule.stuck_seconds and age <= rule.stuck_seconds:
            continue
        return Failure(rule.reason, rule.message.format(pod=pod["metadata"]["name"], why=why, text=text, detail=text),
                       rule.retryable)
    return None


def fatal_problem(pods: list[dict], now: datetime, mounts: Mounts | None = None) -> Failure | None:
    """A failure the Job controller would retry (or wait on) forever in vain: the operator's to decide."""
    for pod in pods:
        phase = pod.get("status", {}).get("phase")
        failure = (operator_decides(pod) if phase == "Failed"
                   else stuck(pod, now, mounts=mounts) if phase == "Pending" else None)
        if failure is not None:
            return failure
    return None


def job_failure(job_condition: dict, pods: list[dict], rules: tuple[Rule, ...] = RULES) -> Failure:
    """The FineTuneJob's failure once the trainer Job itself has failed."""
    job_reason = job_condition.get("reason") or "TrainerFailed"
    text = job_condition.get("message", "")
    for rule in rules:
        if rule.kind == "job" and job_reason in rule.job_reasons:
            return Failure(rule.reason, rule.message.format(text=text, pod="", detail=text, why=job_reason),
                           rule.retryable)
    last = latest_failure(pods)
    if job_reason == "PodFailurePolicy" and last is not None:
        return last  # a FailJob rule of the table ended it: the pod's own failure says why
    message = text or "the trainer Job failed"
    if last is not None:
        message = f"{message}; last failure: {last.reason}: {last.message}"
    return Failure(job_reason, message, False)
