"""Lifecycle controls: suspend and resume, the active deadline, TTL after finishing, the world
size check before a Model is published, and the operator's metrics."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from test_operator import RESULT, condition, finish_pod, job_manifest, result_in_world, running_pod, wait_phase

from kubetools import wait_for

pytestmark = pytest.mark.usefixtures("claims")


def test_suspend_stops_the_trainer_and_resume_starts_it_again(kubectl, operator):
    kubectl.create(job_manifest())
    first = running_pod(kubectl)
    kubectl.merge_patch("ftj", "demo", {"spec": {"suspend": True}})
    ftj = wait_phase(kubectl, "Suspended")
    wait_for(lambda: kubectl.get("job", "demo-trainer")["spec"]["suspend"] is True, 10, what="the Job to be suspended")
    wait_for(lambda: not [p for p in kubectl.items("pods", "finetune.ai/job=demo")
                          if p["status"].get("phase") in ("Pending", "Running")], 60, what="the trainer pods to stop")
    ftj = wait_for(lambda: (lambda f: f if condition(f, "Running")["status"] == "False" and
                            f["status"]["conditions"] and f["status"]["phase"] == "Suspended" else None)(kubectl.get("ftj", "demo")),
                   30, what="Suspended status")
    assert any(c["reason"] == "Suspended" for c in ftj["status"]["conditions"])

    kubectl.merge_patch("ftj", "demo", {"spec": {"suspend": False}})
    second = wait_for(lambda: next((p for p in kubectl.items("pods", "finetune.ai/job=demo")
                                    if p["status"].get("phase") == "Running" and p["metadata"]["name"] != first["metadata"]["name"]), None),
                      60, what="a new trainer pod after resuming")
    wait_phase(kubectl, "Running")
    finish_pod(kubectl, second, 0, json.dumps(RESULT))
    wait_phase(kubectl, "Succeeded")


def test_created_suspended_runs_nothing_until_resumed(kubectl, operator):
    kubectl.create(job_manifest(suspend=True))
    wait_phase(kubectl, "Suspended")
    assert kubectl.get("job", "demo-trainer")["spec"]["suspend"] is True
    assert kubectl.items("pods", "finetune.ai/job=demo") == []
    kubectl.merge_patch("ftj", "demo", {"spec": {"suspend": False}})
    running_pod(kubectl)


def test_deadline_fails_the_job(kubectl, operator):
    kubectl.create(job_manifest(activeDeadlineSeconds=4))
    running_pod(kubectl)
    ftj = wait_phase(kubectl, "Failed", timeout=60)
    assert condition(ftj, "Failed")["reason"] == "DeadlineExceeded"
    assert "spec.activeDeadlineSeconds" in condition(ftj, "Failed")["message"]


def test_ttl_deletes_finished_jobs_and_their_models_outlive_them_unless_asked(kubectl, operator):
    kept = kubectl.create(job_manifest("kept", ttlSecondsAfterFinished=3))
    kubectl.create(job_manifest("cascade", ttlSecondsAfterFinished=3,
                                output={"destination": "pvc://models/cascade", "deleteModelWithJob": True}))
    for name in ("kept", "cascade"):
        finish_pod(kubectl, running_pod(kubectl, name), 0, json.dumps(RESULT))
    for name in ("kept", "cascade"):
        wait_phase(kubectl, "Succeeded", name)
    # The delete itself is sent 3 s after finishing; the FineTuneJob goes when kopf, on that event,
    # stops its timers and drops the finalizer. Twice in CI that event waited behind a request
    # that hung until the operator's 30 s request timeout (networking.request_timeout), so the
    # wait allows for one such timeout.
    for name in ("kept", "cascade"):
        wait_for(lambda name=name: kubectl.get("ftj", name) is None, 90, what=f"the TTL to delete {name}")
    wait_for(lambda: not any(kubectl.get("job", f"{n}-trainer") for n in ("kept", "cascade"))
             and kubectl.get("model", "cascade") is None, 60, what="their children to be garbage-collected")
    # The Model published by default stays, Ready, with its lineage: someone may be serving it.
    model = kubectl.get("model", "kept")
    assert model and model["status"]["phase"] == "Ready", model
    assert model["spec"]["sourceJob"] == {"name": "kept", "uid": kept["metadata"]["uid"]}
    assert "ownerReferences" not in model["metadata"]


def _finish_two_node_job(kubectl, rank0_result: dict) -> None:
    """Both pods of a 2-node CPU job exit 0; rank 0's termination message is `rank0_result`."""
    def both_running():
        pods = [p for p in kubectl.items("pods", "finetune.ai/job=demo") if p["status"].get("phase") == "Running"]
        return pods if len(pods) == 2 else None

    by_index = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p
                for p in wait_for(both_running, 60, what="both trainer pods running")}
    finish_pod(kubectl, by_index["0"], 0, json.dumps(rank0_result))
    finish_pod(kubectl, by_index["1"], 0)


def test_a_trainer_that_joined_a_smaller_world_fails_and_publishes_nothing(kubectl, operator):
    # Each pod trained its own world-size-1 copy (a launcher that ignored torchrun's environment)
    # and "succeeded": the result says world size 1, the job asked for 2 nodes.
    kubectl.create(job_manifest(distributed={"nodes": 2}))
    _finish_two_node_job(kubectl, result_in_world(nodes=1))
    ftj = wait_phase(kubectl, "Failed")
    failed = condition(ftj, "Failed")
    assert failed["reason"] == "WorldSizeMismatch"
    assert "trainer joined world size 1 on 1 node(s) x 1; the job asked for 2 node(s) x 1 = 2" in failed["message"]
    assert condition(ftj, "Ready")["status"] == "False" and "model" not in ftj["status"]
    time.sleep(2)  # a few more passes of the operator: still no Model
    assert kubectl.get("model", "demo") is None
    assert kubectl.get("ftj", "demo")["status"]["phase"] == "Failed"


def test_a_trainer_that_joined_the_world_asked_for_publishes_it_in_the_lineage(kubectl, operator):
    kubectl.create(job_manifest(distributed={"nodes": 2}))
    _finish_two_node_job(kubectl, result_in_world(nodes=2))
    ftj = wait_phase(kubectl, "Succeeded")
    assert ftj["status"]["model"] == "demo"
    model = wait_for(lambda: (lambda m: m if m and m.get("status", {}).get("phase") == "Ready" else None)(
        kubectl.get("model", "demo")), 30, what="the Model to be Ready")
    assert model["spec"]["world"] == {"worldSize": 2, "nodes": 2, "processesPerNode": 1}


def test_operator_metrics(kubectl, operator):
    kubectl.create(job_manifest())
    finish_pod(kubectl, running_pod(kubectl), 1, "boom")  # one retry
    finish_pod(kubectl, wait_for(lambda: next((p for p in kubectl.items("pods", "finetune.ai/job=demo")
                                               if p["status"].get("phase") == "Running"), None), 60, what="the retry"),
               0, json.dumps(RESULT))
    wait_phase(kubectl, "Succeeded")
    text = urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=10).read().decode()
    assert 'finetune_jobs{phase="Succeeded"} 1.0' in text
    assert 'finetune_trainer_retries_total{reason="TrainerError"} 1.0' in text
    assert "finetune_job_start_latency_seconds_count 1.0" in text
    assert 'finetune_job_duration_seconds_count{outcome="Succeeded"} 1.0' in text
    assert "finetune_reconcile_duration_seconds_count" in text and "finetune_reconcile_errors_total" in text


def _metric(operator, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=10).read().decode()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_resyncs_of_an_unchanged_job_write_no_status(kubectl, operator):
    kubectl.create(job_manifest())
    running_pod(kubectl)
    wait_phase(kubectl, "Running")
    time.sleep(2)  # let the writes of the start settle
    writes, passes = _metric(operator, "finetune_status_writes_total"), _metric(operator, "finetune_reconcile_duration_seconds_count")
    time.sleep(10)  # three resyncs (FINETUNE_RESYNC_SECONDS=3), nothing changes
    assert _metric(operator, "finetune_reconcile_duration_seconds_count") >= passes + 3
    assert _metric(operator, "finetune_status_writes_total") == writes
    assert sum(1 for e in kubectl.items("events") if e["involvedObject"]["name"] == "demo"
               and e["reason"] == "TrainerRunning") == 1
