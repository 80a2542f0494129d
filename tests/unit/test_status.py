import json
from datetime import datetime, timedelta, timezone

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
    obs = status.observe(make_job(), None, [])
    assert (obs.phase, obs.reason, obs.message) == ("Pending", "Creating", "creating the trainer Job")


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


def test_a_pod_that_cannot_mount_its_secret_fails_the_job_with_config_error():
    from finetune_operator import failures

    now = datetime(2026, 1, 1, 0, 10, tzinfo=timezone.utc)
    p = pod("Pending")
    p["metadata"].update(uid="pod-uid", creationTimestamp="2026-01-01T00:00:00Z")
    p["spec"] = {"nodeName": "n"}
    p["status"]["conditions"] = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-01T00:04:00Z"}]
    p["status"]["containerStatuses"] = [{"name": "trainer", "state": {"waiting": {"reason": "ContainerCreating"}}}]
    message = 'MountVolume.SetUp failed for volume "base-model-credentials" : secret "hf-token" not found'
    waiting = status.observe(make_job(), job(active=1), [p], now=now, mounts=failures.Mounts(600, {"pod-uid": message}))
    assert (waiting.phase, waiting.reason) == ("Pending", "WaitingForPods")
    assert waiting.message == "pod demo-trainer-0-abc is waiting to start (ContainerCreating)"
    obs = status.observe(make_job(), job(active=1), [p], now=now, mounts=failures.Mounts(300, {"pod-uid": message}))
    assert (obs.phase, obs.reason) == ("Failed", "ConfigError")
    assert obs.message == f"pod demo-trainer-0-abc cannot start: {message}"
    assert obs.completion_time is not None
    assert status.must_stop_trainer(obs.phase, {"metadata": {"ownerReferences": [{"uid": "u"}]}, "status": {}}, "u")


# --- a failed gang member ends the attempt -----------------------------------------------------

def gang_pod(name, phase, created, finished=None, deleting=False):
    p = {"metadata": {"name": name, "creationTimestamp": created}, "status": {"phase": phase}}
    if finished:
        p["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {"exitCode": 1, "finishedAt": finished}}}]
    if deleting:
        p["metadata"]["deletionTimestamp"] = "2026-01-01T00:10:00Z"
    return p


def test_a_peer_created_before_the_failure_ended_goes_with_it():
    """The failure happened when the container finished, not when its pod was created: a peer
    created in between belongs to the failed attempt too."""
    pods = [gang_pod("a", "Failed", "2026-01-01T00:01:00Z", finished="2026-01-01T00:05:00Z"),
            gang_pod("b", "Running", "2026-01-01T00:03:00Z"), gang_pod("c", "Pending", "2026-01-01T00:04:00Z"),
            gang_pod("d", "Pending", "2026-01-01T00:06:00Z")]  # recreated after the failure: the new attempt
    assert status.stale_gang_members(pods) == ["b", "c"]


def test_a_pod_created_in_the_second_of_the_failure_is_stale():
    pods = [gang_pod("a", "Failed", "2026-01-01T00:01:00Z", finished="2026-01-01T00:05:00Z"),
            gang_pod("b", "Running", "2026-01-01T00:05:00Z")]
    assert status.stale_gang_members(pods) == ["b"]


def test_a_failed_pod_that_never_ran_counts_from_its_creation():
    """A pod evicted or rejected before its container started has no terminated state."""
    pods = [gang_pod("a", "Failed", "2026-01-01T00:05:00Z"), gang_pod("b", "Running", "2026-01-01T00:03:00Z"),
            gang_pod("c", "Running", "2026-01-01T00:07:00Z")]
    assert status.stale_gang_members(pods) == ["b"]


def test_the_latest_failure_decides_and_pods_already_going_are_left_alone():
    pods = [gang_pod("a", "Failed", "2026-01-01T00:01:00Z", finished="2026-01-01T00:02:00Z"),
            gang_pod("b", "Failed", "2026-01-01T00:03:00Z", finished="2026-01-01T00:08:00Z"),
            gang_pod("c", "Running", "2026-01-01T00:05:00Z"),
            gang_pod("d", "Running", "2026-01-01T00:04:00Z", deleting=True),  # already being deleted
            gang_pod("e", "Succeeded", "2026-01-01T00:04:00Z"),  # finished: nothing to delete
            {"metadata": {"name": "f", "creationTimestamp": "2026-01-01T00:06:00Z"}}]  # no status yet
    assert status.stale_gang_members(pods) == ["c"]
    assert status.stale_gang_members([gang_pod("c", "Running", "2026-01-01T00:05:00Z"),
                                      {"metadata": {"name": "f", "creationTimestamp": "2026-01-01T00:06:00Z"}}]) == []


# --- what a waiting job says --------------------------------------------------------------------

def test_no_pods_yet_says_so():
    obs = status.observe(make_job(), job(active=1), [])
    assert (obs.phase, obs.reason, obs.message) == ("Pending", "WaitingForPods", "waiting for the trainer pods to start")


def test_an_unscheduled_pod_gives_its_condition_message_or_reason():
    p = pod("Pending")
    p["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                  "message": "0/2 nodes are available: Insufficient nvidia.com/gpu"}]
    assert status.observe(make_job(), job(active=1), [p]).message == (
        "pod demo-trainer-0-abc is not scheduled: 0/2 nodes are available: Insufficient nvidia.com/gpu")
    p["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]
    assert status.observe(make_job(), job(active=1), [p]).message == "pod demo-trainer-0-abc is not scheduled: Unschedulable"
    p["status"]["conditions"] = [{"type": "PodScheduled", "status": "False"}]
    assert status.observe(make_job(), job(active=1), [p]).message == "pod demo-trainer-0-abc is not scheduled: "


# --- a spec the operator cannot read ---------------------------------------------------------------

INVALID_RAW = {"metadata": {"name": "odd", "namespace": "ns", "generation": 3}, "spec": {"training": {"epochs": 0}}}


def test_invalid_spec_patch_writes_every_condition_in_the_api_spelling():
    now = datetime(2026, 1, 1, 0, 0, 0, 700_000, tzinfo=timezone.utc)
    patch = status.invalid_spec_patch(INVALID_RAW, "spec.training.epochs: must be at least 1", now)
    assert patch["completionTime"] == "2026-01-01T00:00:00Z"
    assert patch["conditions"] == [
        {"type": kind, "status": "True" if kind == "Failed" else "False", "reason": "InvalidSpec",
         "message": "spec.training.epochs: must be at least 1", "lastTransitionTime": "2026-01-01T00:00:00Z",
         "observedGeneration": 3}
        for kind in status.CONDITION_TYPES]


def test_invalid_spec_patch_of_an_object_without_generation_leaves_it_out():
    raw = {"metadata": {"name": "odd"}, "spec": {}}
    patch = status.invalid_spec_patch(raw, "x" * 5000, datetime(2026, 1, 1, tzinfo=timezone.utc))
    assert patch["observedGeneration"] is None
    for cond in patch["conditions"]:
        assert "observedGeneration" not in cond and len(cond["message"]) == status.MAX_CONDITION_MESSAGE


def test_invalid_spec_patch_is_stamped_now_in_utc():
    before = datetime.now(timezone.utc).replace(microsecond=0)
    patch = status.invalid_spec_patch(INVALID_RAW, "bad")
    after = datetime.now(timezone.utc)
    stamped = datetime.fromisoformat(patch["completionTime"].replace("Z", "+00:00"))
    assert before <= stamped <= after
    for cond in patch["conditions"]:
        assert cond["lastTransitionTime"] == patch["completionTime"]


def test_a_pod_the_api_server_has_not_filled_in_yet_is_waited_for():
    obs = status.observe(make_job(), job(active=1), [{"metadata": {"name": "demo-trainer-0-abc"}}])
    assert (obs.phase, obs.reason, obs.message) == ("Pending", "WaitingForPods", "waiting for the trainer pods to start")


def test_a_job_without_status_or_with_a_false_condition_is_not_finished():
    bare = {"metadata": {"name": "demo-trainer"}}
    assert status.observe(make_job(), bare, []).reason == "WaitingForPods"
    not_yet = job(active=1)
    not_yet["status"]["conditions"] = [{"type": "Complete", "status": "False"}, {"type": "Failed", "status": "False"}]
    assert status.observe(make_job(), not_yet, []).reason == "WaitingForPods"
    mine = {"metadata": {"name": "demo-trainer", "ownerReferences": [{"uid": "uid-1"}]}, "status": {}}
    assert status.must_stop_trainer("Failed", {**mine, "status": not_yet["status"]}, "uid-1")
    complete = {**mine, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert not status.must_stop_trainer("Failed", complete, "uid-1")
    assert not status.must_stop_trainer("Failed", {"metadata": {"name": "demo-trainer"}}, "uid-1")  # no owner at all


def test_success_message_and_completion_time():
    no_eval = {**RESULT, "metrics": {**RESULT["metrics"], "evalLoss": None, "trainLoss": 0.123456}}
    done = job([("Complete", {"lastTransitionTime": "2026-01-01T02:00:00Z"})], startTime="2026-01-01T00:00:00Z")
    obs = status.observe(make_job(), done, [pod("Succeeded", exit_code=0, message=json.dumps(no_eval))])
    assert (obs.phase, obs.reason, obs.message) == ("Succeeded", "Completed", "trained 9 steps; train loss 0.1235")
    assert (obs.start_time, obs.completion_time) == ("2026-01-01T00:00:00Z", "2026-01-01T02:00:00Z")
    obs = status.observe(make_job(), job([("Complete", {})], completionTime="2026-01-01T01:00:00Z"),
                         [pod("Succeeded", exit_code=0, message=json.dumps(RESULT))])
    assert obs.message == "trained 9 steps; train loss 0.5, eval loss 0.7"
    assert obs.completion_time == "2026-01-01T01:00:00Z"


def test_a_result_that_cannot_be_read_is_invalid_and_a_missing_one_is_no_result():
    obs = status.observe(make_job(), job([("Complete", {})], completionTime="t"), [pod("Succeeded", exit_code=0, message="not json")])
    assert (obs.phase, obs.reason, obs.completion_time) == ("Failed", "InvalidResult", "t") and obs.message
    obs = status.observe(make_job(), job([("Complete", {})], completionTime="t"), [pod("Succeeded", exit_code=0)])
    assert (obs.phase, obs.reason, obs.completion_time) == ("Failed", "NoResult", "t")
    gone = status.observe(make_job(), job([("Complete", {})], completionTime="t"), [pod("Failed", exit_code=1)])
    assert (gone.phase, gone.reason, gone.message, gone.completion_time) == ("Failed",
        "NoResult", "the trainer Job completed but its pods are gone, so no result can be read", "t")


def test_rank_zero_is_read_by_index_then_age():
    good, bad = json.dumps(RESULT), "not json"
    pods = [pod("Succeeded", "10", 0, good, name="j"), pod("Succeeded", "2", 0, bad, name="c")]
    assert status.observe(make_job(), job([("Complete", {})]), pods).reason == "InvalidResult"  # rank 2 before rank 10
    old, new = pod("Succeeded", "0", 0, good, name="old"), pod("Succeeded", "0", 0, bad, name="new")
    old["metadata"]["creationTimestamp"], new["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z"
    assert status.observe(make_job(), job([("Complete", {})]), [new, old]).phase == "Succeeded"
    unindexed = pod("Succeeded", "0", 0, good, name="u")
    del unindexed["metadata"]["annotations"]
    assert status.observe(make_job(), job([("Complete", {})]), [pod("Succeeded", "1", 0, bad, name="b"), unindexed]).phase == "Succeeded"


def test_a_failed_job_ends_when_its_condition_turned_true():
    failed = job([("Failed", {"reason": "DeadlineExceeded", "message": "Job was active longer than specified deadline",
                              "lastTransitionTime": "2026-01-01T03:00:00Z"})], startTime="2026-01-01T00:00:00Z")
    obs = status.observe(make_job(), failed, [])
    assert obs.phase == "Failed" and (obs.start_time, obs.completion_time) == ("2026-01-01T00:00:00Z", "2026-01-01T03:00:00Z")


def test_running_message_counts_pods_and_retries():
    ftj = make_job(distributed={"nodes": 2}, resources={"acceleratorsPerNode": 1}, training={"globalBatchSize": 32})
    pods = [pod("Running"), pod("Running", "1", name="demo-trainer-1-abc")]
    obs = status.observe(ftj, job(active=2, startTime="2026-01-01T00:00:00Z"), pods)
    assert (obs.phase, obs.reason, obs.message, obs.running) == ("Running", "TrainerRunning", "2 trainer pod(s) running", True)
    assert obs.start_time == "2026-01-01T00:00:00Z"
    obs = status.observe(ftj, job(active=2, failed=3), pods)
    assert obs.message == "2 trainer pod(s) running after 3 failed attempt(s)"
    done = status.observe(make_job(), job(active=0), [pod("Succeeded", exit_code=0)])
    assert (done.message, done.running) == ("the trainer finished; waiting for its Job to complete", True)


def test_suspending_until_the_job_is_suspended_and_its_pods_are_gone():
    ftj = make_job(suspend=True)
    running_job = {"metadata": {"name": "demo-trainer"}, "spec": {"suspend": False}, "status": {"startTime": "s"}}
    obs = status.observe(ftj, running_job, [])
    assert (obs.phase, obs.reason, obs.message, obs.start_time) == (
        "Suspended", "Suspending", "stopping the trainer after it saves a checkpoint", "s")
    suspended_job = {"metadata": {"name": "demo-trainer"}, "spec": {"suspend": True}, "status": {"startTime": "s"}}
    assert status.observe(ftj, suspended_job, [pod("Pending")]).reason == "Suspending"
    assert status.observe(ftj, suspended_job, [pod("Succeeded")]).reason == "Suspended"
    obs = status.observe(ftj, suspended_job, [])
    assert (obs.message, obs.start_time) == ("suspended; set spec.suspend to false to resume from the latest checkpoint", "s")


def test_condition_message_bound_is_exact():
    assert status.bounded("x" * status.MAX_CONDITION_MESSAGE) == "x" * status.MAX_CONDITION_MESSAGE
    assert status.bounded("x" * (status.MAX_CONDITION_MESSAGE + 1)) == "x" * (status.MAX_CONDITION_MESSAGE - 1) + "…"


def test_provisioned_once_pods_ran():
    ftj = make_job()
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    def conds(obs):
        return {c.type: (c.status, c.reason, c.message) for c in status.conditions_for(obs, ftj, now)}
    running = conds(status.Observation("Running", "TrainerRunning", "1 trainer pod(s) running", running=True))
    assert running == {"Ready": ("False", "TrainerRunning", "1 trainer pod(s) running"),
                       "Provisioned": ("True", "PodsScheduled", ""),
                       "Running": ("True", "TrainerRunning", "1 trainer pod(s) running"),
                       "Succeeded": ("False", "TrainerRunning", "1 trainer pod(s) running"),
                       "Failed": ("False", "TrainerRunning", "1 trainer pod(s) running")}
    # A job that failed after its trainer started was provisioned; one that failed before was not.
    ran = conds(status.Observation("Failed", "OutOfMemory", "m", start_time="2026-01-01T00:00:00Z"))
    assert ran["Provisioned"] == ("True", "PodsScheduled", "") and ran["Failed"] == ("True", "OutOfMemory", "m")
    never = conds(status.Observation("Failed", "NoInstanceType", "none fits"))
    assert never["Provisioned"] == ("False", "NoInstanceType", "none fits")
    waiting = conds(status.Observation("Provisioning", "WaitingForCapacity", "w", start_time="2026-01-01T00:00:00Z"))
    assert waiting["Provisioned"] == ("False", "WaitingForCapacity", "w")
    succeeded = conds(status.Observation("Succeeded", "Completed", "done", start_time="2026-01-01T00:00:00Z"))
    assert succeeded["Ready"] == ("True", "Completed", "done") and succeeded["Succeeded"][0] == "True"
    assert succeeded["Provisioned"] == ("True", "PodsScheduled", "")
    finishing = conds(status.Observation("Running", "TrainerFinished", "f"))
    assert finishing["Provisioned"] == ("True", "TrainerFinished", "f")


def test_conditions_are_stamped_in_whole_seconds():
    ftj = make_job()
    now = datetime(2026, 1, 1, 0, 0, 0, 900_000, tzinfo=timezone.utc)
    conds = status.conditions_for(status.Observation("Pending", "WaitingForPods", "m"), ftj, now)
    assert {c.last_transition_time for c in conds} == {datetime(2026, 1, 1, tzinfo=timezone.utc)}
    patch = status.status_patch(status.Observation("Running", "TrainerRunning", "m", running=True), ftj, "t", now)
    assert patch["startTime"] == "2026-01-01T00:00:00Z"
    assert {c["lastTransitionTime"] for c in patch["conditions"]} == {"2026-01-01T00:00:00Z"}


def test_a_success_shows_the_batch_size_and_epochs_the_trainer_chose():
    plan = {"device": "cpu", "worldSize": 1, "precision": "fp32", "attention": "sdpa", "compile": False,
            "fusedLoss": False, "checkpointedLayers": 0, "layers": 2, "zeroStage": 0, "offload": "none",
            "microBatchSize": 2, "globalBatchSize": 2, "epochs": 16, "accumulationSteps": 1, "totalSteps": 9}
    obs = status.observe(make_job(), job([("Complete", {})], completionTime="2026-01-01T01:00:00Z"),
                         [pod("Succeeded", exit_code=0, message=json.dumps({**RESULT, "runPlan": plan}))])
    patch = status.status_patch(obs, make_job(), "demo-trainer", T0)
    assert (patch["progress"]["globalBatchSize"], patch["progress"]["epochs"]) == (2, 16)
    # A trainer that does not report them (older images) leaves them out rather than guessing.
    older = {**plan}
    del older["globalBatchSize"], older["epochs"]
    obs = status.observe(make_job(), job([("Complete", {})], completionTime="2026-01-01T01:00:00Z"),
                         [pod("Succeeded", exit_code=0, message=json.dumps({**RESULT, "runPlan": older}))])
    assert {"globalBatchSize", "epochs"}.isdisjoint(status.status_patch(obs, make_job(), "demo-trainer", T0)["progress"])


def test_status_patch_carries_everything_for_a_success():
    obs = status.observe(make_job(), job([("Complete", {})], completionTime="2026-01-01T01:00:00Z"),
                         [pod("Succeeded", exit_code=0, message=json.dumps(RESULT))])
    ftj = make_job(output={"destination": "pvc://models/demo", "modelName": "my-model"})
    patch = status.status_patch(obs, ftj, "demo-trainer", T0)
    assert patch["trainerJob"] == "demo-trainer" and patch["model"] == "my-model"
    assert patch["completionTime"] == "2026-01-01T01:00:00Z" and "startTime" not in patch
    assert patch["progress"] == {"step": 9, "totalSteps": 9, "percent": 100, "loss": 0.5, "eta": "0s"}
    assert patch["conditions"][0] == {"type": "Ready", "status": "True", "reason": "Completed",
                                      "message": "trained 9 steps; train loss 0.5, eval loss 0.7",
                                      "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 2}
    bare = status.status_patch(status.Observation("Succeeded", "Completed", "done"), make_job(), None, T0)
    assert bare["model"] == "demo" and "progress" not in bare and bare["trainerJob"] is None
    assert "model" not in status.status_patch(RUNNING, make_job(), "demo-trainer", T0)


def test_nested_and_odd_fields_in_a_patch():
    current = {"phase": "Running", "progress": {"step": 3}, "conditions": "garbage"}
    assert not status.patch_changes({"phase": "Running", "conditions": "garbage"}, current)
    assert status.patch_changes({"progress": {"step": 3}}, {"progress": "odd"})
    assert status.patch_changes({"progress": {"step": 3}}, {})
    assert status.patch_changes({"progress": {"step": None}}, {"progress": {"step": 3}})
    assert not status.patch_changes({"progress": {"step": None}}, {"progress": {}})
    assert not status.patch_changes({}, None) and not status.patch_changes({"model": None}, None)
    assert status.patch_changes({"conditions": [{"type": "x"}]}, {"conditions": [{"type": "x"}]}) is False
    assert status.patch_changes({"conditions": [{"type": "y"}]}, {"conditions": [{"type": "x"}]})


# --- waiting for Karpenter ---------------------------------------------------------------------------

CREATED = "2026-01-01T00:00:00Z"
PROVISIONING_JOB = {"metadata": {"name": "demo-trainer", "creationTimestamp": CREATED}, "status": {"startTime": "s"}}
UNSCHEDULED = [{"metadata": {"name": "demo-trainer-0-abc"}, "spec": {}, "status": {"phase": "Pending"}}]


def karpenter(**spec):
    return make_job(nodePool={"provisioner": "karpenter", "capacityType": "spot"}, **spec)


def at(seconds):
    return datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=seconds)


def test_no_instance_type_names_the_request():
    ftj = karpenter(distributed={"nodes": 2}, resources={"acceleratorsPerNode": 4, "instanceType": "p5.48xlarge", "cpu": "16",
                                                         "memory": "128Gi"}, training={"globalBatchSize": 32})
    event = status.KarpenterEvent("FailedScheduling", "Failed to schedule pod, no instance type satisfied resources")
    obs = status.observe(ftj, PROVISIONING_JOB, UNSCHEDULED, status.Provisioning((event,)), at(60))
    assert (obs.phase, obs.reason) == ("Failed", "NoInstanceType")
    assert obs.message == ("no instance type satisfies the request (2 node(s), cpu 16, memory 128Gi, 4 nvidia.com/gpu, "
                           "instance type p5.48xlarge): Failed to schedule pod, no instance type satisfied resources")
    assert (obs.start_time, obs.completion_time) == ("s", "2026-01-01T00:01:00Z")
    cpu = karpenter(resources={"accelerator": "none"})
    obs = status.observe(cpu, PROVISIONING_JOB, UNSCHEDULED, status.Provisioning((event,)), at(60))
    assert obs.message.startswith("no instance type satisfies the request (1 node(s), cpu 8, memory 64Gi): ")


def test_an_older_no_instance_type_event_still_fails_the_job():
    events = (status.KarpenterEvent("FailedScheduling", "nodepool requirements filtered out all available instance types"),
              status.KarpenterEvent("Nominated", "Pod should schedule on nodeclaim x"))
    obs = status.observe(karpenter(), PROVISIONING_JOB, UNSCHEDULED, status.Provisioning(events), at(60))
    assert obs.reason == "NoInstanceType"


def test_provisioning_times_out_after_the_timeout_not_at_it():
    ftj = karpenter()
    info = status.Provisioning((status.KarpenterEvent("Nominated", "first"), status.KarpenterEvent("Nominated", "second"),
                                status.KarpenterEvent("Nominated", "latest")), 600)
    obs = status.observe(ftj, PROVISIONING_JOB, UNSCHEDULED, info, at(600))
    assert (obs.phase, obs.reason, obs.message, obs.start_time) == ("Provisioning", "WaitingForCapacity", "latest", "s")
    obs = status.observe(ftj, PROVISIONING_JOB, UNSCHEDULED, info, at(601.5))
    assert (obs.phase, obs.reason, obs.message) == ("Failed", "ProvisioningTimeout", "trainer pods not scheduled after 601s: latest")
    assert (obs.start_time, obs.completion_time) == ("s", "2026-01-01T00:10:01Z")
    obs = status.observe(ftj, PROVISIONING_JOB, UNSCHEDULED, status.Provisioning((), 600), at(700))
    assert obs.message == "trainer pods not scheduled after 700s: waiting for the trainer pods to start"
    assert status.observe(ftj, PROVISIONING_JOB, UNSCHEDULED, status.Provisioning(), at(900)).reason == "WaitingForCapacity"
    assert status.observe(ftj, PROVISIONING_JOB, UNSCHEDULED, status.Provisioning(), at(901)).reason == "ProvisioningTimeout"


def test_provisioning_without_events_says_what_the_pods_show():
    p = {"metadata": {"name": "demo-trainer-0-abc"}, "spec": {},
         "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "message": "no nodes"}]}}
    obs = status.observe(karpenter(), PROVISIONING_JOB, [p], status.Provisioning(), at(10))
    assert (obs.phase, obs.reason, obs.message) == ("Provisioning", "WaitingForCapacity", "pod demo-trainer-0-abc is not scheduled: no nodes")
    assert status.observe(karpenter(), PROVISIONING_JOB, [], status.Provisioning(), at(10)).reason == "WaitingForCapacity"
    scheduled = [{**p, "spec": {"nodeName": "n"}}]
    assert status.observe(karpenter(), PROVISIONING_JOB, scheduled, status.Provisioning(), at(10)).phase == "Pending"


def test_own_pool_limits_are_joined_and_the_newest_event_wins():
    own = "all available instance types exceed limits for nodepool (NodePool=finetune-uid-1)"
    cpu_limit = "cpu limits exceeded for nodepool (NodePool=finetune-uid-1)"
    events = (status.KarpenterEvent("FailedScheduling", "Failed to schedule pod, " + cpu_limit),
              status.KarpenterEvent("FailedScheduling", f"Failed to schedule pod, {own}; {cpu_limit}; "))
    obs = status.observe(karpenter(), PROVISIONING_JOB, UNSCHEDULED, status.Provisioning(events), at(10))
    assert (obs.phase, obs.reason, obs.message, obs.start_time) == ("Provisioning", "NodePoolLimitReached", f"{own}; {cpu_limit}", "s")
    assert status.KarpenterEvent("FailedScheduling", f"Failed to schedule pod, {own};  ; {cpu_limit}").refusals == [own, cpu_limit]


def test_only_a_failed_scheduling_event_can_show_the_pool_left_out():
    others = "Failed to schedule pod, did not tolerate taint (taint=finetune.ai/job=x:NoSchedule)"
    ready = at(10)
    assert status.pool_left_out(status.KarpenterEvent("FailedScheduling", others, at(12)), "finetune-uid-1", ready)
    assert not status.pool_left_out(status.KarpenterEvent("Nominated", others, at(12)), "finetune-uid-1", ready)
    named = "Failed to schedule pod, node limits have been exhausted for nodepool (NodePool=finetune-uid-1)"
    assert not status.pool_left_out(status.KarpenterEvent("FailedScheduling", named, at(12)), "finetune-uid-1", ready)
    assert status.pool_left_out(status.KarpenterEvent("FailedScheduling", named, at(12)), "finetune-other", ready)


def test_provisioning_is_timed_against_the_current_time_by_default():
    old = {"metadata": {"name": "demo-trainer", "creationTimestamp": "2020-01-01T00:00:00Z"}, "status": {}}
    obs = status.observe(karpenter(), old, UNSCHEDULED, status.Provisioning())
    assert (obs.phase, obs.reason) == ("Failed", "ProvisioningTimeout")


def test_a_fatal_pod_problem_keeps_the_start_time():
    p = pod("Pending")
    p["status"]["containerStatuses"] = [{"name": "trainer", "state": {"waiting": {"reason": "InvalidImageName", "message": "bad"}}}]
    p["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    obs = status.observe(make_job(), job(active=1, startTime="2026-01-01T00:00:00Z"), [p], now=at(3600))
    assert obs.phase == "Failed" and obs.start_time == "2026-01-01T00:00:00Z" and obs.completion_time == "2026-01-01T01:00:00Z"


def test_a_waiting_pod_gives_its_reason_and_message():
    p = pod("Pending")
    p["status"]["containerStatuses"] = [{"name": "trainer", "state": {"waiting": {"reason": "ContainerCreating", "message": "pulling"}}}]
    assert status.observe(make_job(), job(active=1), [p]).message == "pod demo-trainer-0-abc is waiting to start (ContainerCreating): pulling"
