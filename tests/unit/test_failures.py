from datetime import datetime, timezone

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
