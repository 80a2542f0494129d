import json
from datetime import datetime, timezone

from factories import make_job

from finetune_operator import status

RESULT = {"files": {"adapter_model.safetensors": {"sha256": "a" * 64, "size": 10}},
          "metrics": {"trainLoss": 0.5, "evalLoss": 0.7, "initialEvalLoss": 3.0, "steps": 9, "tokens": 99}}


def job(conditions=(), **status_fields):
    return {"metadata": {"name": "demo-trainer"},
            "status": {"conditions": [{"type": t, "status": "True", **extra} for t, extra in conditions], **status_fields}}


def pod(phase, index="0", exit_code=None, message=None, reason=None, name="demo-trainer-0-abc"):
    p = {"metadata": {"name": name, "annotations": {"batch.kubernetes.io/job-completion-index": index}},
         "status": {"phase": phase}}
    if exit_code is not None:
        term = {"exitCode": exit_code, "finishedAt": "2026-01-01T00:00:00Z"}
        if message is not None:
            term["message"] = message
        if reason:
            term["reason"] = reason
        p["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": term}}]
    return p


def test_no_job_yet_is_pending():
    assert status.observe(make_job(), None, []).phase == "Pending"


def test_unscheduled_pod_says_why():
    p = pod("Pending")
    p["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "message": "0/2 nodes are available: Insufficient nvidia.com/gpu"}]
    obs = status.observe(make_job(), job(active=1), [p])
    assert obs.phase == "Pending" and "Insufficient nvidia.com/gpu" in obs.message


def test_running_needs_every_node():
    ftj = make_job(distributed={"nodes": 2}, resources={"acceleratorsPerNode": 1}, training={"globalBatchSize": 32})
    assert status.observe(ftj, job(active=2), [pod("Running")]).phase == "Pending"
    assert status.observe(ftj, job(active=2), [pod("Running"), pod("Running", "1")]).phase == "Running"


def test_complete_with_result_succeeds():
    obs = status.observe(make_job(), job([("Complete", {})], completionTime="t"), [pod("Succeeded", exit_code=0, message=json.dumps(RESULT))])
    assert obs.phase == "Succeeded" and obs.result.metrics.steps == 9 and "eval loss 0.7" in obs.message


def test_complete_reads_rank_zero():
    pods = [pod("Succeeded", "1", 0, "", name="b"), pod("Succeeded", "0", 0, json.dumps(RESULT), name="a")]
    assert status.observe(make_job(), job([("Complete", {})]), pods).phase == "Succeeded"


def test_complete_without_result_fails():
    obs = status.observe(make_job(), job([("Complete", {})]), [pod("Succeeded", exit_code=0)])
    assert (obs.phase, obs.reason) == ("Failed", "NoResult")


def test_complete_with_pods_gone_fails():
    assert status.observe(make_job(), job([("Complete", {})]), []).reason == "NoResult"


def test_failed_job_carries_the_pod_failure():
    obs = status.observe(make_job(), job([("Failed", {"reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"})]),
                         [pod("Failed", exit_code=137, message="Killed", reason="OOMKilled")])
    assert obs.phase == "Failed" and obs.reason == "BackoffLimitExceeded"
    assert "last failure: OutOfMemory: pod demo-trainer-0-abc: exit code 137 (OOMKilled): Killed" in obs.message


def test_conditions_follow_conventions():
    ftj = make_job()
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    obs = status.Observation("Running", "TrainerRunning", "1 pod running", running=True)
    conds = {c.type: c for c in status.conditions_for(obs, ftj, now)}
    assert set(conds) == {"Ready", "Provisioned", "Running", "Succeeded", "Failed"}
    assert conds["Running"].status == "True" and conds["Failed"].status == "False"
    assert all(c.observed_generation == 2 for c in conds.values())


def test_transition_time_moves_only_when_status_flips():
    ftj = make_job()
    t0, t1 = datetime(2026, 1, 1, tzinfo=timezone.utc), datetime(2026, 1, 2, tzinfo=timezone.utc)
    running = status.Observation("Running", "TrainerRunning", "m", running=True)
    ftj.status.conditions = status.conditions_for(running, ftj, t0)
    again = {c.type: c for c in status.conditions_for(running, ftj, t1)}
    assert again["Running"].last_transition_time == t0
    done = status.Observation("Failed", "X", "m")
    flipped = {c.type: c for c in status.conditions_for(done, ftj, t1)}
    assert flipped["Running"].last_transition_time == t1 and flipped["Failed"].last_transition_time == t1


def test_status_patch_for_success():
    obs = status.observe(make_job(), job([("Complete", {})]), [pod("Succeeded", exit_code=0, message=json.dumps(RESULT))])
    patch = status.status_patch(obs, make_job(), "demo-trainer")
    assert patch["phase"] == "Succeeded" and patch["model"] == "demo" and patch["observedGeneration"] == 2
    assert patch["progress"]["percent"] == 100


def test_suspended_once_pods_are_gone():
    ftj = make_job(suspend=True)
    suspended_job = {"metadata": {"name": "demo-trainer"}, "spec": {"suspend": True}, "status": {}}
    assert status.observe(ftj, suspended_job, [pod("Running")]).reason == "Suspending"
    obs = status.observe(ftj, suspended_job, [])
    assert (obs.phase, obs.reason) == ("Suspended", "Suspended")


def test_start_time_is_when_the_trainer_first_ran():
    ftj = make_job()
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    pending = status.Observation("Pending", "WaitingForPods", "m", start_time="2025-12-31T23:00:00Z")
    assert "startTime" not in status.status_patch(pending, ftj, "demo-trainer", t0)
    running = status.Observation("Running", "TrainerRunning", "m", running=True)
    assert status.status_patch(running, ftj, "demo-trainer", t0)["startTime"] == "2026-01-01T00:00:00Z"
    ftj.status.start_time = t0
    assert "startTime" not in status.status_patch(running, ftj, "demo-trainer", t0)  # kept across retries
