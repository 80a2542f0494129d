import re
from datetime import datetime, timezone

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
    (lambda: failures.classify(failed(2, message="line 3: not JSON")), "InvalidInput"),
    (lambda: failures.classify(failed(137, "OOMKilled")), "OutOfMemory"),
    (lambda: failures.classify(failed(143)), "Preempted"),
    (lambda: failures.classify(failed(1, message="boom")), "TrainerError"),
    (lambda: failures.stuck(waiting("ErrImageNeverPull", "2026-01-01T00:09:59Z"), NOW), "ImagePullFailed"),
    (lambda: failures.stuck(waiting("ErrImagePull"), NOW), "ImagePullFailed"),
    (lambda: failures.stuck(waiting("CreateContainerConfigError"), NOW), "ConfigError"),
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
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]}},
    ]}
    acting = [rule for rule in failures.RULES if rule.job_action]
    assert {r.reason for r in acting} == {"NodeLost", "Evicted", "InvalidInput"}
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
    assert failures.stuck(waiting("ContainerCreating"), NOW) is None
