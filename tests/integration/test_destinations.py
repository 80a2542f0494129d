"""Exclusive output destinations against the real API server, with the operator running.

A job whose `output.destination` is the destination of another job that holds it (live, or
Succeeded: its Model points at those files), or is nested inside it or around it, fails at once
with `DestinationInUse` and creates nothing, so the first job's result.json and adapter are never
touched. The trainer's owner file covers what the operator cannot see (tests/trainer/
test_trainer_ownership.py). Needs only the control plane: the first job's trainer pod need not
run (the operator reads the holder's phase, which the test sets through the status subresource
where it needs Succeeded or Failed).
"""

from __future__ import annotations

import time

import pytest

from kubetools import wait_for
from test_operator import condition, job_manifest, wait_phase

pytestmark = pytest.mark.usefixtures("claims")


def started(kubectl, name: str) -> dict:
    """The job once the operator created its trainer Job and wrote a first phase."""
    wait_for(lambda: kubectl.get("job", f"{name}-trainer"), 30, what=f"the trainer Job of {name}")
    return wait_for(lambda: (f := kubectl.get("ftj", name)) and f.get("status", {}).get("phase") and f, 30,
                    what=f"a phase for {name}")


def assert_refused(kubectl, name: str, holder: str) -> dict:
    ftj = wait_phase(kubectl, "Failed", name)
    failed = condition(ftj, "Failed")
    assert failed["reason"] == "DestinationInUse", failed
    assert f"FineTuneJob {holder}" in failed["message"] and "Destinations are exclusive" in failed["message"], failed
    # Nothing was created for it: no trainer, no config, no Model.
    time.sleep(1)
    assert kubectl.get("job", f"{name}-trainer") is None
    assert kubectl.get("configmap", f"{name}-trainer-config") is None
    assert kubectl.get("model", name) is None
    events = [e for e in kubectl.items("events") if e["involvedObject"]["name"] == name]
    assert "DestinationInUse" in {e["reason"] for e in events}, events
    return failed


def set_phase(kubectl, name: str, phase: str) -> None:
    kubectl.merge_patch("ftj", name, {"status": {"phase": phase}}, subresource="status")
    wait_for(lambda: kubectl.get("ftj", name)["status"]["phase"] == phase, 10, what=f"{name} to read {phase}")


def test_a_live_jobs_destination_is_refused_to_another_job_same_or_nested(kubectl, operator):
    kubectl.create(job_manifest("first", output={"destination": "pvc://models/shared"}))
    started(kubectl, "first")

    kubectl.create(job_manifest("same", output={"destination": "pvc://models//shared/"}))
    failed = assert_refused(kubectl, "same", "first")
    assert "is the destination of FineTuneJob first" in failed["message"]
    kubectl.create(job_manifest("inside", output={"destination": "pvc://models/shared/v2"}))
    assert "overlaps the destination of" in assert_refused(kubectl, "inside", "first")["message"]
    kubectl.create(job_manifest("around", output={"destination": "pvc://models"}))
    assert_refused(kubectl, "around", "first")

    # A neighbour whose name merely starts the same is not nested: it runs.
    kubectl.create(job_manifest("neighbour", output={"destination": "pvc://models/shared-2"}))
    started(kubectl, "neighbour")
    # The holder itself is unaffected by its refused rivals.
    assert kubectl.get("ftj", "first")["status"]["phase"] not in ("Failed", "Succeeded")


def test_a_succeeded_jobs_files_are_held_and_a_failed_jobs_are_not(kubectl, operator):
    kubectl.create(job_manifest("done", output={"destination": "pvc://models/result"}))
    started(kubectl, "done")
    set_phase(kubectl, "done", "Succeeded")  # as if its Model were published from these files
    kubectl.create(job_manifest("again", output={"destination": "pvc://models/result"}))
    failed = assert_refused(kubectl, "again", "done")
    assert "(Succeeded)" in failed["message"]

    kubectl.create(job_manifest("broken", output={"destination": "pvc://models/retry"}))
    started(kubectl, "broken")
    set_phase(kubectl, "broken", "Failed")
    # A failed job holds nothing for the operator (the trainer's owner file still keeps its
    # checkpoints from being resumed by another job).
    kubectl.create(job_manifest("fixed", output={"destination": "pvc://models/retry"}))
    started(kubectl, "fixed")
