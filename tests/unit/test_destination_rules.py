"""Exclusive output destinations: which other FineTuneJob holds a destination (destinations.py)."""

import pytest

from finetune_operator import destinations, failures


def ftj(name, destination, phase=None, uid=None, created="2026-01-01T00:00:10Z"):
    raw = {"metadata": {"name": name, "uid": uid or f"uid-{name}", "creationTimestamp": created},
           "spec": {"output": {"destination": destination}}}
    if phase:
        raw["status"] = {"phase": phase}
    return raw


MINE = ftj("mine", "pvc://models/run", created="2026-01-01T00:00:10Z")


@pytest.mark.parametrize("phase", ["Pending", "Provisioning", "Running", "Suspended", "Succeeded"])
def test_a_live_or_succeeded_job_holds_its_destination(phase):
    message = destinations.conflict(MINE, [MINE, ftj("first", "pvc://models/run", phase)])
    assert message is not None
    assert "is the destination of FineTuneJob first" in message and f"({phase})" in message


def test_a_failed_job_holds_nothing():
    assert destinations.conflict(MINE, [MINE, ftj("first", "pvc://models/run", "Failed")]) is None


@pytest.mark.parametrize("theirs", ["pvc://models/run/sub", "pvc://models", "pvc://models//run/"])
def test_nested_and_equal_destinations_conflict(theirs):
    assert destinations.conflict(MINE, [ftj("first", theirs, "Running")]) is not None


@pytest.mark.parametrize("theirs", ["pvc://models/run2", "pvc://other/run", "pvc://models/ru"])
def test_disjoint_destinations_do_not(theirs):
    assert destinations.conflict(MINE, [ftj("first", theirs, "Running")]) is None


def test_the_job_itself_is_not_a_conflict():
    running_me = ftj("mine", "pvc://models/run", "Running", uid=MINE["metadata"]["uid"])
    assert destinations.conflict(MINE, [running_me]) is None


def test_a_recreated_job_of_the_same_name_is_another_job():
    old = ftj("mine", "pvc://models/run", "Succeeded", uid="old-uid")
    assert destinations.conflict(MINE, [old]) is not None


def test_of_two_unstarted_jobs_the_older_goes_first():
    older = ftj("a", "pvc://models/run", created="2026-01-01T00:00:05Z")
    newer = ftj("b", "pvc://models/run", created="2026-01-01T00:00:20Z")
    assert destinations.conflict(newer, [older, newer]) is not None
    assert destinations.conflict(older, [older, newer]) is None
    same_second = [ftj("x", "pvc://models/run", uid="u1"), ftj("y", "pvc://models/run", uid="u2")]
    assert [destinations.conflict(j, same_second) is None for j in same_second] == [True, False]


def test_unreadable_jobs_are_skipped():
    assert destinations.conflict(MINE, [{"metadata": {"name": "odd"}}, {"spec": {"output": {"destination": 7}}}]) is None


def test_the_trainers_destination_in_use_exit_is_its_own_reason():
    """The trainer exits 3 when output.dir's owner file names another job: DestinationInUse, at
    once, also under torchrun (exit code 1, the real one in the termination message)."""
    text = "output.destination is in use: /mnt/output belongs to job 'first' (uid u1)"
    plain = {"metadata": {"name": "p"}, "status": {"phase": "Failed", "containerStatuses": [
        {"name": "trainer", "state": {"terminated": {"exitCode": 3, "message": text}}}]}}
    torchrun = {"metadata": {"name": "p"}, "status": {"phase": "Failed", "containerStatuses": [
        {"name": "trainer", "state": {"terminated": {"exitCode": 1, "message": '{"error": "%s", "exitCode": 3}' % text}}}]}}
    for pod in (plain, torchrun):
        failure = failures.classify(pod)
        assert (failure.reason, failure.retryable) == ("DestinationInUse", False)
        assert "belongs to job 'first'" in failure.message
    assert failures.operator_decides(plain) is None  # the Job controller ends it (podFailurePolicy)
    assert failures.operator_decides(torchrun).reason == "DestinationInUse"
