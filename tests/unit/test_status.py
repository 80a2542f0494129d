import json
from datetime import datetime, timezone

from factories import make_job, with_status

from finetune_operator import status
from finetune_trainer.result import World

RESULT = {"files": {"adapter_model.safetensors": {"sha256": "a" * 64, "size": 10}},
          "metrics": {"trainLoss": 0.5, "evalLoss": 0.7, "initialEvalLoss": 3.0, "steps": 9, "tokens": 99},
          "world": {"worldSize": 1, "nodes": 1, "processesPerNode": 1}}


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


def test_a_trainer_that_finished_before_its_job_completes_is_still_running():
    """The trainer pod has exited 0 but the Job controller has not yet marked the Job Complete:
    the phase stays Running (it went back to Pending here once, seen in the GPU e2e record)."""
    done = pod("Succeeded", exit_code=0, message=json.dumps(RESULT))
    obs = status.observe(make_job(), job(active=0, succeeded=1), [done])
    assert (obs.phase, obs.reason) == ("Running", "TrainerFinished")
    ftj = make_job(distributed={"nodes": 2}, resources={"acceleratorsPerNode": 1}, training={"globalBatchSize": 32})
    rank1_done = pod("Succeeded", "1", exit_code=0, name="demo-trainer-1-abc")
    assert status.observe(ftj, job(active=1), [pod("Running"), rank1_done]).phase == "Running"
    assert status.observe(ftj, job(active=1), [rank1_done]).phase == "Pending"  # rank 0 not started yet


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


def world(world_size, nodes, per_node):
    return World(world_size=world_size, nodes=nodes, processes_per_node=per_node)


def test_the_world_asked_for_is_nodes_times_processes_per_node():
    assert status.asked_world(make_job()) == world(1, 1, 1)
    # Processes per node come from acceleratorsPerNode; a CPU job runs one process per node.
    gpus = make_job(distributed={"nodes": 2}, resources={"accelerator": "nvidia.com/gpu", "acceleratorsPerNode": 4},
                    training={"globalBatchSize": 32})
    assert status.asked_world(gpus) == world(8, 2, 4)
    cpu = make_job(distributed={"nodes": 2}, resources={"accelerator": "none", "acceleratorsPerNode": 4},
                   training={"globalBatchSize": 32})
    assert status.asked_world(cpu) == world(2, 2, 1)


def test_a_world_is_checked_on_every_number():
    two_nodes = make_job(distributed={"nodes": 2}, resources={"accelerator": "nvidia.com/gpu", "acceleratorsPerNode": 2},
                         training={"globalBatchSize": 32})
    assert status.world_mismatch(two_nodes, world(4, 2, 2)) is None
    for joined in (world(1, 1, 1), world(2, 1, 2), world(4, 1, 4), world(4, 4, 1), world(2, 2, 1), world(3, 2, 2)):
        assert status.world_mismatch(two_nodes, joined), joined
    assert status.world_mismatch(make_job(distributed={"nodes": 2}, training={"globalBatchSize": 32}),
                                 world(1, 1, 1)) == (
        "trainer joined world size 1 on 1 node(s) x 1; the job asked for 2 node(s) x 1 = 2; no Model was published")


def test_a_trainer_that_joined_the_wrong_world_fails_the_job():
    # Two pods that each trained their own copy: both exit 0 with a result of world size 1.
    ftj = make_job(distributed={"nodes": 2}, training={"globalBatchSize": 32})
    pods = [pod("Succeeded", "0", 0, json.dumps(RESULT), name="a"), pod("Succeeded", "1", 0, json.dumps(RESULT), name="b")]
    obs = status.observe(ftj, job([("Complete", {})], completionTime="t"), pods)
    assert (obs.phase, obs.reason) == ("Failed", "WorldSizeMismatch") and obs.result is None
    assert "trainer joined world size 1 on 1 node(s) x 1; the job asked for 2 node(s) x 1 = 2" in obs.message
    assert obs.completion_time == "t"
    patch = status.status_patch(obs, ftj, "demo-trainer")
    assert patch["phase"] == "Failed" and "model" not in patch
    right = {**RESULT, "world": {"worldSize": 2, "nodes": 2, "processesPerNode": 1}}
    pods[0] = pod("Succeeded", "0", 0, json.dumps(right), name="a")
    obs = status.observe(ftj, job([("Complete", {})], completionTime="t"), pods)
    assert obs.phase == "Succeeded" and obs.result.world == world(2, 2, 1)


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


# --- the status is written only when it changes ----------------------------------------------------

T0, T1 = datetime(2026, 1, 1, tzinfo=timezone.utc), datetime(2026, 1, 1, 0, 5, tzinfo=timezone.utc)
RUNNING = status.Observation("Running", "TrainerRunning", "1 trainer pod(s) running", running=True,
                             start_time="2026-01-01T00:00:00Z")


def test_a_second_pass_over_an_unchanged_job_patches_nothing():
    first = status.status_patch(RUNNING, make_job(), "demo-trainer", T0)
    raw, ftj = with_status(make_job(), first)
    assert not status.patch_changes(status.status_patch(RUNNING, ftj, "demo-trainer", T1), raw["status"])
    done = status.observe(make_job(), job([("Complete", {})], completionTime="2026-01-01T01:00:00Z"),
                          [pod("Succeeded", exit_code=0, message=json.dumps(RESULT))])
    raw, ftj = with_status(make_job(), status.status_patch(done, ftj, "demo-trainer", T0))
    assert not status.patch_changes(status.status_patch(done, ftj, "demo-trainer", T1), raw["status"])


def test_any_change_the_patch_carries_is_a_change():
    current = status.status_patch(RUNNING, make_job(), "demo-trainer", T0)
    _, ftj = with_status(make_job(), current)
    for obs in (status.Observation("Running", "TrainerRunning", "2 trainer pod(s) running", running=True),  # a message
                status.Observation("Running", "OtherReason", RUNNING.message, running=True),  # a reason
                status.Observation("Pending", "WaitingForPods", "m"),  # the phase, and transitions
                status.Observation("Running", "TrainerRunning", RUNNING.message, running=True,
                                   completion_time="2026-01-01T01:00:00Z")):  # a time
        assert status.patch_changes(status.status_patch(obs, ftj, "demo-trainer", T1), current), obs
    assert status.patch_changes({**current, "observedGeneration": 3}, current)
    assert status.patch_changes({**current, "trainerJob": None}, current)  # merge patch: null deletes
    assert not status.patch_changes({**current, "model": None}, current)  # deleting what is not there


def test_fields_the_patch_does_not_carry_and_spelling_do_not_count():
    current = status.status_patch(RUNNING, make_job(), "demo-trainer", T0)
    patch = json.loads(json.dumps(current))
    current["progress"] = {"step": 3, "totalSteps": 10}  # live progress, written by progress.py
    for cond in current["conditions"]:
        cond["lastTransitionTime"] = cond["lastTransitionTime"].replace("Z", "+00:00")
    assert not status.patch_changes(patch, current)
    assert status.patch_changes({**patch, "progress": {"step": 4}}, current)
    assert not status.patch_changes({**patch, "progress": {"step": 3}}, current)
    assert status.patch_changes(patch, None)


def test_the_trainer_job_is_stopped_only_for_a_failure_the_operator_decided():
    mine = {"metadata": {"name": "demo-trainer", "ownerReferences": [{"uid": "uid-1"}]}, "status": {}}
    assert status.must_stop_trainer("Failed", mine, "uid-1")
    assert not status.must_stop_trainer("Running", mine, "uid-1")
    assert not status.must_stop_trainer("Failed", None, "uid-1")
    assert not status.must_stop_trainer("Failed", mine, "uid-2")  # NameConflict: someone else's Job
    finished = {**mine, "status": {"conditions": [{"type": "Failed", "status": "True"}]}}
    assert not status.must_stop_trainer("Failed", finished, "uid-1")  # the Job controller ended it
    deleting = {"metadata": {**mine["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"}, "status": {}}
    assert not status.must_stop_trainer("Failed", deleting, "uid-1")


def test_a_job_the_operator_cannot_read_gets_failed_invalid_spec_from_its_raw_object():
    from pydantic import ValidationError

    from finetune_operator.api import FineTuneJob, api_errors

    raw = {"apiVersion": "finetune.ai/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "odd", "namespace": "ns", "uid": "u", "generation": 3},
           "spec": {"baseModel": {"source": "preset://tiny-llama"}, "dataset": {"source": "pvc://d/x.jsonl"},
                    "output": {"destination": "pvc://m/o"}, "training": {"epochs": 0}}}
    try:
        FineTuneJob.model_validate(raw)
        raise AssertionError("expected a validation error")
    except ValidationError as exc:
        message = api_errors(exc)
    assert message.startswith("spec.training.epochs: "), message
    patch = status.invalid_spec_patch(raw, message)
    assert patch["phase"] == "Failed" and patch["observedGeneration"] == 3 and patch["completionTime"]
    by_type = {c["type"]: c for c in patch["conditions"]}
    assert by_type["Failed"]["status"] == "True" and by_type["Ready"]["status"] == "False"
    assert {c["reason"] for c in by_type.values()} == {"InvalidSpec"} and by_type["Failed"]["message"] == message


def test_condition_messages_are_bounded():
    long = "x" * 50_000
    obs = status.Observation("Failed", "InvalidSpec", long)
    [cond] = [c for c in status.conditions_for(obs, make_job()) if c.type == "Failed"]
    assert len(cond.message) == status.MAX_CONDITION_MESSAGE and cond.message.endswith("…")
