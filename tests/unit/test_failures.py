import re
from datetime import datetime, timedelta, timezone

import pytest

from finetune_operator import failures

NOW = datetime(2026, 1, 1, 0, 10, tzinfo=timezone.utc)


def failed(exit_code, reason="Error", message="", conditions=()):
    return {"metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": "Failed", "conditions": list(conditions),
                       "containerStatuses": [{"name": "trainer", "state": {"terminated": {
                           "exitCode": exit_code, "reason": reason, "message": message, "finishedAt": "2026-01-01T00:05:00Z"}}}]}}


def waiting(reason, created="2026-01-01T00:00:00Z"):
    return {"metadata": {"name": "p", "creationTimestamp": created},
            "status": {"phase": "Pending", "containerStatuses": [{"name": "trainer", "state": {"waiting": {"reason": reason, "message": "m"}}}]}}


def test_classification():
    assert failures.classify(failed(2, message="line 3: not JSON")).reason == "InvalidInput"
    oom = failures.classify(failed(137, "OOMKilled"))
    assert oom.reason == "OutOfMemory" and not oom.retryable and "microBatchSize" in oom.message
    assert failures.classify(failed(1, message="RuntimeError: CUDA out of memory")).reason == "OutOfMemory"
    assert failures.classify(failed(143)).retryable
    lost = failures.classify(failed(137, conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "DeletionByPodGC"}]))
    assert (lost.reason, lost.retryable) == ("NodeLost", True)
    assert failures.classify(failed(1, message="NCCL timeout")) == failures.Failure("TrainerError", "pod p: exit code 1 (Error): NCCL timeout", True)


def test_fatal_problems_end_the_job_at_once():
    assert failures.fatal_problem([failed(137, "OOMKilled")], NOW).reason == "OutOfMemory"
    assert failures.fatal_problem([failed(1)], NOW) is None  # retryable: left to the Job's backoff
    assert failures.fatal_problem([failed(2)], NOW) is None  # the pod failure policy fails the Job
    assert failures.fatal_problem([waiting("InvalidImageName", "2026-01-01T00:09:59Z")], NOW).reason == "ImagePullFailed"
    assert failures.fatal_problem([waiting("ImagePullBackOff", "2026-01-01T00:09:00Z")], NOW) is None  # may be transient
    assert failures.fatal_problem([waiting("ImagePullBackOff")], NOW).reason == "ImagePullFailed"
    assert failures.fatal_problem([waiting("CreateContainerConfigError")], NOW).reason == "ConfigError"


def test_job_failure_reasons():
    assert failures.job_failure({"reason": "DeadlineExceeded", "message": "Job was active longer than specified deadline"}, []).reason == "DeadlineExceeded"
    assert failures.job_failure({"reason": "PodFailurePolicy"}, [failed(2, message="bad line 4")]).reason == "InvalidInput"
    exhausted = failures.job_failure({"reason": "BackoffLimitExceeded", "message": "limit"}, [failed(1, message="boom")])
    assert exhausted.reason == "BackoffLimitExceeded" and "last failure: TrainerError" in exhausted.message


def test_torchrun_hides_the_exit_code_but_the_message_tells():
    under_torchrun = failed(1, message='{"error": "dataset /d.jsonl line 4: not JSON", "exitCode": 2}')
    failure = failures.classify(under_torchrun)
    assert failure.reason == "InvalidInput" and "line 4: not JSON" in failure.message and '"error"' not in failure.message
    assert failures.fatal_problem([under_torchrun], NOW).reason == "InvalidInput"


# --- the one table -------------------------------------------------------------------------------

def disrupted(reason, exit_code=137):
    return failed(exit_code, conditions=[{"type": "DisruptionTarget", "status": "True", "reason": reason}])


# One example per rule of failures.RULES, in table order: (signal, the reason it must give).
EXAMPLES = [
    (lambda: failures.classify(disrupted("DeletionByTaintManager", exit_code=2)), "NodeLost"),
    (lambda: failures.classify(disrupted("EvictionByEvictionAPI")), "Evicted"),
    (lambda: failures.classify(failed(3, message="output.destination is in use: ...")), "DestinationInUse"),
    (lambda: failures.classify(failed(2, message="line 3: not JSON")), "InvalidInput"),
    (lambda: failures.classify(failed(137, "OOMKilled")), "OutOfMemory"),
    (lambda: failures.classify(failed(143)), "Preempted"),
    (lambda: failures.classify(failed(1, message="boom")), "TrainerError"),
    (lambda: failures.stuck(waiting("ErrImageNeverPull", "2026-01-01T00:09:59Z"), NOW), "ImagePullFailed"),
    (lambda: failures.stuck(waiting("ErrImagePull"), NOW), "ImagePullFailed"),
    (lambda: failures.stuck(waiting("CreateContainerConfigError"), NOW), "ConfigError"),  # 10 minutes > the mount timeout
    (lambda: failures.job_failure({"reason": "DeadlineExceeded", "message": "too long"}, [failed(1)]), "DeadlineExceeded"),
]


def test_every_rule_is_exercised_and_gives_its_reason_retryable_and_message():
    assert [reason for _, reason in EXAMPLES] == [rule.reason for rule in failures.RULES]
    for (signal, reason), rule in zip(EXAMPLES, failures.RULES):
        failure = signal()
        assert failure is not None, rule
        assert (failure.reason, failure.retryable) == (rule.reason, rule.retryable), rule
        assert all(part in failure.message for part in re.split(r"\{\w+\}", rule.message)), (rule, failure.message)


def test_messages_keep_their_advice():
    assert failures.classify(disrupted("DeletionByPodGC")).message == \
        "pod p was disrupted (DeletionByPodGC); the retry resumes from the latest checkpoint"
    assert failures.classify(failed(143)).message.endswith("; the trainer checkpointed on SIGTERM and the retry resumes")
    assert failures.classify(failed(2, message="bad")).message == \
        "bad configuration or data, retrying cannot help: pod p: exit code 2 (Error): bad"
    assert "request more memory" in failures.classify(failed(137, "OOMKilled")).message
    assert failures.stuck(waiting("InvalidImageName"), NOW).message == "pod p cannot pull its image (InvalidImageName): m"
    assert failures.stuck(waiting("CreateContainerConfigError"), NOW).message == "pod p cannot start: m"
    evicted = failed(137)
    evicted["status"]["reason"] = "Evicted"  # an older kubelet: no DisruptionTarget condition
    assert (failures.classify(evicted).reason, failures.classify(evicted).retryable) == ("Evicted", True)


def test_the_jobs_pod_failure_policy_is_rendered_from_the_table():
    assert failures.pod_failure_policy("trainer") == {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},  # NodeLost and Evicted: once
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [3]}},
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]}},
    ]}
    acting = [rule for rule in failures.RULES if rule.job_action]
    assert {r.reason for r in acting} == {"NodeLost", "Evicted", "DestinationInUse", "InvalidInput"}
    assert all(not r.retryable for r in acting if r.job_action == "FailJob")
    assert all(r.retryable for r in acting if r.job_action == "Ignore")
    # The Job controller sees a pod condition's type, not its reason: rules that share one agree.
    by_condition: dict[str, set] = {}
    for rule in failures.RULES:
        if rule.pod_condition:
            by_condition.setdefault(rule.pod_condition, set()).add(rule.job_action)
    assert all(len(actions) == 1 for actions in by_condition.values()), by_condition


def test_a_new_rule_reaches_both_the_policy_and_classify():
    rule = failures.Rule("Custom", False, "custom: {detail}", exit_codes=(42, 41), job_action="FailJob")
    rules = (rule, *failures.RULES)
    assert failures.pod_failure_policy("c", rules)["rules"][0] == \
        {"action": "FailJob", "onExitCodes": {"containerName": "c", "operator": "In", "values": [41, 42]}}
    assert failures.classify(failed(42), rules) == failures.Failure("Custom", "custom: pod p: exit code 42 (Error)", False)
    assert failures.operator_decides(failed(42), rules) is None  # the Job controller ends it itself
    with pytest.raises(ValueError, match="needs an exit code or a pod condition"):
        failures.Rule("Bad", False, "", container_reasons=("OOMKilled",), job_action="FailJob").policy_rule("c")


def test_the_operator_decides_what_the_job_controller_cannot_see():
    assert failures.operator_decides(failed(2)) is None  # FailJob on the container's exit code
    under_torchrun = failed(1, message='{"error": "bad line", "exitCode": 2}')
    assert failures.operator_decides(under_torchrun).reason == "InvalidInput"  # exit code 1: the Job cannot tell
    assert failures.operator_decides(failed(137, "OOMKilled")).reason == "OutOfMemory"
    assert failures.operator_decides(failed(1)) is None and failures.operator_decides(failed(143)) is None
    assert failures.operator_decides(disrupted("DeletionByPodGC", exit_code=2)) is None  # retryable, and ignored
    assert failures.stuck(waiting("ErrImagePull", "2026-01-01T00:09:00Z"), NOW) is None  # not stuck long enough
    assert failures.stuck(waiting("ContainerCreating", "2026-01-01T00:06:00Z"), NOW) is None  # within the mount timeout


def mounting(reason="ContainerCreating", scheduled="2026-01-01T00:04:00Z", message="", uid="pod-uid"):
    """A scheduled pod whose container waits for its volumes or env, as the kubelet reports it."""
    pod = waiting(reason)
    pod["metadata"]["uid"] = uid
    pod["spec"] = {"nodeName": "n"}
    pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": scheduled}]
    pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"] = message
    return pod


def failed_mount(uid="pod-uid", message='MountVolume.SetUp failed for volume "x" : secret "y" not found',
                 at="2026-01-01T00:05:00Z", component="kubelet", reason="FailedMount"):
    return {"reason": reason, "message": message, "lastTimestamp": at, "source": {"component": component},
            "involvedObject": {"kind": "Pod", "name": "p", "uid": uid}}


def test_a_pod_that_cannot_mount_fails_after_the_mount_timeout_since_it_was_scheduled():
    # Scheduled 6 minutes before NOW (created 10 minutes before: time waiting for a node does not count).
    events = failures.mount_messages([mounting()], [failed_mount()])
    assert events == {"pod-uid": 'MountVolume.SetUp failed for volume "x" : secret "y" not found'}
    late = failures.fatal_problem([mounting()], NOW, failures.Mounts(300, events))
    assert (late.reason, late.retryable) == ("ConfigError", False)
    assert late.message == 'pod p cannot start: MountVolume.SetUp failed for volume "x" : secret "y" not found'
    assert failures.fatal_problem([mounting()], NOW, failures.Mounts(400, events)) is None  # not yet
    assert failures.fatal_problem([mounting(scheduled="2026-01-01T00:09:00Z")], NOW, failures.Mounts(300, events)) is None
    # No FailedMount event: ContainerCreating is also a long image pull, so the job waits on.
    assert failures.fatal_problem([mounting()], NOW, failures.Mounts(300)) is None
    assert failures.fatal_problem([mounting()], NOW + timedelta(hours=2), failures.Mounts(300)) is None
    # CreateContainerConfigError (a missing key in a Secret or ConfigMap env) heals if the user
    # creates it, so it gets the same timeout; the kubelet's own message wins over an event.
    config = mounting("CreateContainerConfigError", message='secret "y" not found')
    assert failures.fatal_problem([config], NOW, failures.Mounts(400)) is None
    quiet = mounting("CreateContainerConfigError")
    assert failures.fatal_problem([quiet], NOW, failures.Mounts(300)).message == (
        "pod p cannot start: its container has waited in CreateContainerConfigError for 360s since the pod was scheduled")
    assert failures.fatal_problem([config], NOW, failures.Mounts(300, events)).message == 'pod p cannot start: secret "y" not found'


def test_only_the_kubelets_failed_mount_events_on_the_pods_own_uid_count():
    pods = [mounting()]
    assert failures.mount_messages(pods, [failed_mount(uid="another-pod-of-that-name")]) == {}
    assert failures.mount_messages(pods, [failed_mount(component="someone")]) == {}
    assert failures.mount_messages(pods, [failed_mount(reason="FailedScheduling")]) == {}
    newest = failures.mount_messages(pods, [failed_mount(message="new", at="2026-01-01T00:06:00Z"), failed_mount(message="old")])
    assert newest == {"pod-uid": "new"}


def test_events_are_read_only_for_pods_waiting_past_the_timeout():
    running = mounting()
    running["status"]["phase"] = "Running"
    assert failures.waiting_for_mounts([mounting(), running, mounting(scheduled="2026-01-01T00:09:00Z")], NOW, 300) == [mounting()]
    assert failures.waiting_for_mounts([mounting("ErrImagePull")], NOW, 300) == []


# --- pods and events as the API server may show them ---------------------------------------------

def pod(name="p", phase="Failed", created="2026-01-01T00:00:00Z", container=None, **status):
    """A pod with at most one trainer container status (`container`: its status fields)."""
    metadata = {"name": name, **({"creationTimestamp": created} if created else {})}
    statuses = [{"name": "trainer", **container}] if container is not None else []
    return {"metadata": metadata, "status": {"phase": phase, "containerStatuses": statuses, **status}}


def test_a_pod_with_no_status_or_no_trainer_state_is_a_plain_trainer_error():
    bare = {"metadata": {"name": "p"}}
    assert failures.terminated(bare) is None and failures.waiting_state(bare) is None
    assert failures.classify(bare) == failures.Failure("TrainerError", "pod p: exit code None (Error)", True)
    assert failures.stuck(bare, NOW) is None
    assert failures.fatal_problem([bare], NOW) is None
    assert failures.latest_failure([bare]) is None
    assert failures.waiting_for_mounts([bare], NOW, 0) == []
    assert failures.scheduled_since(bare) is None
    # A container status without a state (the kubelet has not reported one yet).
    stateless = pod(phase="Pending", container={})
    assert failures.waiting_state(stateless) is None and failures.terminated(stateless) is None
    assert failures.stuck(stateless, NOW) is None
    # Another container's termination is not the trainer's.
    sidecar = pod()
    sidecar["status"]["containerStatuses"] = [{"name": "sidecar", "state": {"terminated": {"exitCode": 2}}}]
    assert failures.terminated(sidecar) is None
    assert failures.classify(sidecar).reason == "TrainerError"


def test_a_restarted_container_is_judged_by_its_last_termination():
    term = {"exitCode": 2, "reason": "Error", "message": "line 3: not JSON"}
    for state in ({"waiting": {"reason": "CrashLoopBackOff"}}, {"running": {}}, None):
        restarted = pod(container={"lastState": {"terminated": term}, **({"state": state} if state is not None else {})})
        assert failures.terminated(restarted) == term
        assert failures.classify(restarted) == failures.Failure(
            "InvalidInput", "bad configuration or data, retrying cannot help: pod p: exit code 2 (Error): line 3: not JSON", False)
    # The current termination wins over the last one.
    both = pod(container={"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}, "lastState": {"terminated": term}})
    assert failures.classify(both).reason == "OutOfMemory"


def test_the_detail_names_the_container_reason_or_error_and_keeps_2000_characters_of_the_message():
    no_reason = pod(container={"state": {"terminated": {"exitCode": 1, "message": "boom"}}})
    assert failures.classify(no_reason) == failures.Failure("TrainerError", "pod p: exit code 1 (Error): boom", True)
    assert failures.classify(failed(1, reason="ContainerCannotRun")).message == "pod p: exit code 1 (ContainerCannotRun)"
    long = failures.classify(failed(1, message="x" * 2500))
    assert long.message == "pod p: exit code 1 (Error): " + "x" * 2000


def test_a_reported_failure_without_an_exit_code_keeps_the_containers():
    failure = failures.classify(failed(2, message='{"error": "dataset line 4: not JSON"}'))
    assert failure == failures.Failure(
        "InvalidInput", "bad configuration or data, retrying cannot help: pod p: exit code 2 (Error): dataset line 4: not JSON", False)
    assert failures.classify(failed(1, message='{"error": "crashed"}')).message == "pod p: exit code 1 (Error): crashed"


def test_only_a_true_disruption_target_condition_or_a_disruption_reason_is_a_disruption():
    other = failures.classify(failed(137, conditions=[{"type": "Ready", "status": "True", "reason": "PodCompleted"}]))
    assert (other.reason, other.message) == ("TrainerError", "pod p: exit code 137 (Error)")
    withdrawn = failed(137, conditions=[{"type": "DisruptionTarget", "status": "False", "reason": "EvictionByEvictionAPI"}])
    assert failures.classify(withdrawn).reason == "TrainerError"
    no_reason = failures.classify(failed(137, conditions=[{"type": "DisruptionTarget", "status": "True"}]))
    assert no_reason == failures.Failure(
        "Evicted", "pod p was disrupted (DisruptionTarget); the retry resumes from the latest checkpoint", True)
    # A pod reason that is no disruption does not make one.
    rejected = failed(1, message="boom")
    rejected["status"]["reason"] = "UnexpectedAdmissionError"
    assert failures.classify(rejected) == failures.Failure("TrainerError", "pod p: exit code 1 (Error): boom", True)
    lost = failed(1)
    lost["status"]["reason"] = "NodeLost"
    assert failures.classify(lost) == failures.Failure(
        "NodeLost", "pod p was disrupted (NodeLost); the retry resumes from the latest checkpoint", True)


def test_custom_rules_keep_the_tables_semantics():
    # A waiting or job rule ahead of the failed-pod rules does not stop classify.
    waiting_first = (failures.Rule("Stuck", False, "{text}", waiting_reasons=("X",)),
                     failures.Rule("Gone", False, "{text}", job_reasons=("Y",)), *failures.RULES)
    assert failures.classify(failed(2, message="bad"), waiting_first).reason == "InvalidInput"
    # A rule with a container reason only matches that reason, not every pod.
    oom_only = (failures.Rule("Killed", False, "{detail}", container_reasons=("OOMKilled",)), *failures.RULES)
    assert failures.classify(failed(1, message="boom"), oom_only).reason == "TrainerError"
    assert failures.classify(failed(137, "OOMKilled"), oom_only).reason == "Killed"
    # Every placeholder is there for every rule: {text} is the termination message alone.
    said = (failures.Rule("Said", False, "pod {pod} said: {text}", exit_codes=(42,)), *failures.RULES)
    assert failures.classify(failed(42, message=" boom "), said) == failures.Failure("Said", "pod p said: boom", False)
    # A table without a catch-all fails loudly.
    with pytest.raises(LookupError, match="^the failure rules end with a catch-all$"):
        failures.classify(failed(1), ())


def test_a_waiting_rule_that_does_not_match_yet_leaves_the_pod_to_later_rules():
    later = failures.Rule("Later", False, "pod {pod} ({why}): {detail}",
                          waiting_reasons=("ContainerCreating", "CreateContainerConfigError", "ErrImagePull"))
    rules = (*failures.RULES, later)
    # Within the mount timeout.
    config = mounting("CreateContainerConfigError", scheduled="2026-01-01T00:09:00Z", message="key missing")
    assert failures.stuck(config, NOW, rules) == failures.Failure("Later", "pod p (CreateContainerConfigError): key missing", False)
    # Past it, but ContainerCreating without the kubelet's word (it may be pulling the image).
    assert failures.stuck(mounting(), NOW, rules, failures.Mounts(300)).reason == "Later"
    # An image pull error not yet stuck long enough.
    assert failures.stuck(waiting("ErrImagePull", "2026-01-01T00:09:00Z"), NOW, rules) == \
        failures.Failure("Later", "pod p (ErrImagePull): m", False)


def test_the_timeouts_are_exceeded_only_past_them():
    # Exactly 120 s of ErrImagePull is not yet stuck; a second more is.
    assert failures.stuck(waiting("ErrImagePull", "2026-01-01T00:08:00Z"), NOW) is None
    assert failures.stuck(waiting("ErrImagePull", "2026-01-01T00:07:59Z"), NOW) == \
        failures.Failure("ImagePullFailed", "pod p cannot pull its image (ErrImagePull): m", False)
    # Scheduled exactly 360 s ago: a mount timeout of 360 s is not yet past.
    events = {"pod-uid": "secret missing"}
    assert failures.stuck(mounting(), NOW, mounts=failures.Mounts(360, events)) is None
    assert failures.stuck(mounting(), NOW, mounts=failures.Mounts(359, events)) == \
        failures.Failure("ConfigError", "pod p cannot start: secret missing", False)
    assert failures.waiting_for_mounts([mounting()], NOW, 360) == []
    assert failures.waiting_for_mounts([mounting()], NOW, 359) == [mounting()]
    # A pod with no timestamps at all has not waited.
    timeless = mounting("CreateContainerConfigError")
    del timeless["metadata"]["creationTimestamp"]
    timeless["status"]["conditions"] = []
    assert failures.stuck(timeless, NOW, mounts=failures.Mounts(0)) is None
    assert failures.waiting_for_mounts([timeless], NOW, 0) == []
    image = waiting("ErrImagePull")
    del image["metadata"]["creationTimestamp"]
    assert failures.stuck(image, NOW) is None


def test_only_pending_pods_are_stuck():
    for phase in ("Running", "Succeeded", "Unknown"):
        not_pending = waiting("InvalidImageName")
        not_pending["status"]["phase"] = phase
        assert failures.stuck(not_pending, NOW) is None
        assert failures.fatal_problem([not_pending], NOW) is None
    # The first pod with a fatal problem decides.
    oom, image = failed(137, "OOMKilled"), waiting("InvalidImageName")
    assert failures.fatal_problem([failed(1), oom, image], NOW).reason == "OutOfMemory"
    assert failures.fatal_problem([failed(1), image, oom], NOW).reason == "ImagePullFailed"


def test_a_waiting_state_without_a_message_leaves_no_none_in_the_message():
    quiet = waiting("InvalidImageName")
    del quiet["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
    failure = failures.stuck(quiet, NOW)
    assert failure.reason == "ImagePullFailed" and "None" not in failure.message
    assert failure.message.startswith("pod p cannot pull its image (InvalidImageName)")


def test_scheduled_since_is_the_pod_scheduled_conditions_transition_else_creation():
    scheduled = mounting(scheduled="2026-01-01T00:04:00Z")
    scheduled["status"]["conditions"].insert(0, {"type": "Initialized", "status": "True", "lastTransitionTime": "2026-01-01T00:01:00Z"})
    assert failures.scheduled_since(scheduled) == "2026-01-01T00:04:00Z"
    unscheduled = mounting()
    unscheduled["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "lastTransitionTime": "2026-01-01T00:04:00Z"},
                                           {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:05:00Z"}]
    assert failures.scheduled_since(unscheduled) == "2026-01-01T00:00:00Z"
    no_time = mounting()
    no_time["status"]["conditions"] = [{"type": "PodScheduled", "status": "True"}]
    assert failures.scheduled_since(no_time) == "2026-01-01T00:00:00Z"
    assert failures.scheduled_since({"metadata": {"creationTimestamp": "2026-01-01T00:02:00Z"}}) == "2026-01-01T00:02:00Z"


def test_the_latest_failure_is_the_last_to_finish_else_the_last_created():
    first_to_start = failed(1, message="later")
    first_to_start["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = "2026-01-01T00:05:00Z"
    second_to_start = failed(2, message="earlier")
    second_to_start["metadata"]["creationTimestamp"] = "2026-01-01T00:01:00Z"
    second_to_start["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = "2026-01-01T00:03:00Z"
    assert failures.latest_failure([first_to_start, second_to_start]) == \
        failures.Failure("TrainerError", "pod p: exit code 1 (Error): later", True)
    assert failures.latest_failure([second_to_start, first_to_start]).message == "pod p: exit code 1 (Error): later"
    # Pods that failed before their container ran: by creation; one without a time counts as oldest.
    newer, older, untimed = pod("newer", created="2026-01-01T00:02:00Z"), pod("older", created="2026-01-01T00:01:00Z"), pod("untimed", created=None)
    assert failures.latest_failure([newer, older, untimed]).message.startswith("pod newer:")
    assert failures.latest_failure([untimed, older]).message.startswith("pod older:")
    assert failures.latest_failure([]) is None
    assert failures.latest_failure([waiting("InvalidImageName"), pod(phase="Running")]) is None


def test_failed_mount_events_as_newer_kubelets_write_them():
    pods = [mounting()]
    # Written through events.k8s.io: no source, eventTime instead of lastTimestamp.
    def event(message, at, **fields):
        return {"reason": "FailedMount", "message": message, "eventTime": at,
                "involvedObject": {"kind": "Pod", "name": "p", "uid": "pod-uid"}, **fields}
    assert failures.mount_messages(pods, [event("a", "2026-01-01T00:05:00.000000Z", reportingComponent="kubelet")]) == {"pod-uid": "a"}
    assert failures.mount_messages(pods, [event("b", "2026-01-01T00:05:00.000000Z", reportingController="kubelet")]) == {"pod-uid": "b"}
    assert failures.mount_messages(pods, [event("c", "2026-01-01T00:05:00.000000Z", reportingComponent="kube-scheduler")]) == {}
    newest = failures.mount_messages(pods, [event("new", "2026-01-01T00:06:00.000000Z", reportingComponent="kubelet"),
                                            event("old", "2026-01-01T00:05:00.000000Z", reportingComponent="kubelet")])
    assert newest == {"pod-uid": "new"}
    # An event with no time at all counts as the oldest.
    untimed = event("untimed", None, reportingComponent="kubelet")
    assert failures.mount_messages(pods, [failed_mount(message="timed"), untimed]) == {"pod-uid": "timed"}
    # The note, when there is no message; nothing at all reads as no message.
    noted = event(None, "2026-01-01T00:05:00Z", reportingComponent="kubelet", note="MountVolume.SetUp failed")
    assert failures.mount_messages(pods, [noted]) == {"pod-uid": "MountVolume.SetUp failed"}
    assert failures.mount_messages(pods, [event(None, "2026-01-01T00:05:00Z", reportingComponent="kubelet")]) == {"pod-uid": ""}
    # Events about no object, or about another kind, do not count.
    orphan = failed_mount()
    del orphan["involvedObject"]
    assert failures.mount_messages(pods, [orphan]) == {}
    node = failed_mount()
    node["involvedObject"]["kind"] = "Node"
    assert failures.mount_messages(pods, [node]) == {}


def test_the_job_failure_without_a_rule_keeps_the_jobs_reason_and_message():
    assert failures.job_failure({}, []) == failures.Failure("TrainerFailed", "the trainer Job failed", False)
    assert failures.job_failure({"reason": "BackoffLimitExceeded"}, []) == \
        failures.Failure("BackoffLimitExceeded", "the trainer Job failed", False)
    assert failures.job_failure({"reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}, [failed(1, message="boom")]) == \
        failures.Failure("BackoffLimitExceeded",
                         "Job has reached the specified backoff limit; last failure: TrainerError: pod p: exit code 1 (Error): boom", False)
    # PodFailurePolicy with no failed pod to say why: the Job's own word.
    assert failures.job_failure({"reason": "PodFailurePolicy", "message": "Container trainer exited with 2"}, []) == \
        failures.Failure("PodFailurePolicy", "Container trainer exited with 2", False)
    assert failures.job_failure({"reason": "DeadlineExceeded", "message": "Job was active longer than specified deadline"}, []) == \
        failures.Failure("DeadlineExceeded",
                         "the job ran longer than spec.activeDeadlineSeconds: Job was active longer than specified deadline", False)
    deadline = failures.job_failure({"reason": "DeadlineExceeded"}, [])
    assert deadline.message.startswith("the job ran longer than spec.activeDeadlineSeconds") and "None" not in deadline.message
    # Every placeholder is there for a job rule too: {text} and {detail} the Job's message, {why} its reason, no pod.
    custom = (failures.Rule("Custom", True, "job {why}{pod}: {detail} / {text}", job_reasons=("Custom",)), *failures.RULES)
    assert failures.job_failure({"reason": "Custom", "message": "m"}, [], custom) == failures.Failure("Custom", "job Custom: m / m", True)


@pytest.mark.parametrize("error", ["short", "é" * 5000, "x" * 10_000, "🙂" * 1500 + "tail"])
def test_a_failure_message_fits_the_limit_in_bytes_and_keeps_its_exit_code(error):
    """The trainer writes it, the operator reads it (one pair of functions): however long the
    error and however many bytes its characters take, the message is valid JSON within
    Kubernetes' limit, so the real exit code survives torchrun's 1."""
    from finetune_trainer.protocol import TERMINATION_MESSAGE_LIMIT, failure_message

    message = failure_message(error, 2)
    assert len(message.encode()) <= TERMINATION_MESSAGE_LIMIT
    code, said = failures._reported({"exitCode": 1, "message": message})
    assert code == 2
    assert said == error or (said.endswith("…") and error.startswith(said[:-1]) and len(said) > 900)
    assert failures.classify(failed(1, message=message)).reason == "InvalidInput"
