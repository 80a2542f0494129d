"""reconcile against a fake API: status PATCHes only on a change, transitions once, and per-job
state that lives only as long as the job does."""

from __future__ import annotations

import asyncio
import copy
from datetime import datetime, timezone

from factories import make_job, with_status

from finetune_operator import kube, metrics, reconcile, status
from finetune_operator.settings import OperatorSettings

SETTINGS = OperatorSettings(default_provisioner="none")


def merge(target: dict, patch: dict) -> dict:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


class FakeApi:
    def __init__(self, monkeypatch, pods: list[dict]) -> None:
        raw, _ = with_status(make_job(resources={"accelerator": "none", "cpu": "1", "memory": "1Gi"}), {})
        self.ftj = raw
        self.job = {"metadata": {"name": "demo-trainer", "uid": "job-uid", "ownerReferences": [{"uid": "uid-1", "controller": True}]},
                    "spec": {"suspend": False}, "status": {"active": 1}}
        self.pods = pods
        self.status_patches: list[dict] = []
        self.deleted: list[tuple[str, str]] = []
        self.events: list[str] = []
        monkeypatch.setattr(kube, "get", self.get)
        monkeypatch.setattr(kube, "list_", self.list_)
        monkeypatch.setattr(kube, "patch_status", self.patch_status)
        monkeypatch.setattr(kube, "delete", self.delete)
        monkeypatch.setattr(reconcile.kopf, "event", lambda obj, type, reason, message: self.events.append(reason))

    async def get(self, kind, namespace, name):
        found = {"FineTuneJob": self.ftj, "Job": self.job}.get(kind)
        return copy.deepcopy(found) if found is not None else None

    async def list_(self, kind, namespace, selector=None, fields=None):
        return copy.deepcopy(self.pods) if kind == "Pod" else []

    async def patch_status(self, kind, namespace, name, status):
        self.status_patches.append(status)
        merge(self.ftj.setdefault("status", {}), status)

    async def delete(self, kind, namespace, name, propagation="Background"):
        self.deleted.append((kind, name))
        if kind == "Job":
            self.job = None
        if kind == "FineTuneJob":
            self.ftj = None
        return True


def running_pod(uid="pod-1", phase="Running", **terminated):
    pod = {"metadata": {"name": f"demo-trainer-0-{uid}", "uid": uid, "creationTimestamp": "2026-01-01T00:00:00Z"},
           "spec": {"nodeName": "n"}, "status": {"phase": phase}}
    if terminated:
        pod["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": terminated}}]
    return pod


async def test_an_unchanged_job_is_not_patched_again(monkeypatch):
    api = FakeApi(monkeypatch, [running_pod()])
    jobs = reconcile.JobStates()
    for _ in range(3):
        await reconcile.reconcile("team-a", "demo", SETTINGS, jobs)
    assert len(api.status_patches) == 1 and api.ftj["status"]["phase"] == "Running"
    assert api.events == ["TrainerRunning"]  # one transition, one event
    api.pods = [running_pod(), running_pod("pod-2")]  # the message changes: one more write, no event
    await reconcile.reconcile("team-a", "demo", SETTINGS, jobs)
    await reconcile.reconcile("team-a", "demo", SETTINGS, jobs)
    assert len(api.status_patches) == 2 and api.events == ["TrainerRunning"]
    assert ("team-a", "demo") in jobs  # live: its state is kept


async def test_state_is_dropped_once_the_job_is_finished_or_gone(monkeypatch):
    api = FakeApi(monkeypatch, [running_pod()])
    jobs = reconcile.JobStates()
    await reconcile.reconcile("team-a", "demo", SETTINGS, jobs)
    assert len(jobs) == 1
    api.pods = [running_pod(phase="Failed", exitCode=137, reason="OOMKilled", finishedAt="2026-01-01T00:01:00Z")]
    await reconcile.reconcile("team-a", "demo", SETTINGS, jobs)  # the operator fails it
    assert api.ftj["status"]["phase"] == "Failed" and api.ftj["status"]["conditions"][-1]["reason"] == "OutOfMemory"
    assert api.deleted == [("Job", "demo-trainer")]  # OOM: the Job controller would retry it
    assert len(jobs) == 0
    await reconcile.reconcile("team-a", "demo", SETTINGS, jobs)  # a later Job event
    assert len(jobs) == 0 and len(api.status_patches) == 2 and api.deleted == [("Job", "demo-trainer")]
    api.ftj = None  # deleted
    await reconcile.reconcile("team-a", "demo", SETTINGS, jobs)
    assert len(jobs) == 0


async def test_a_failed_pod_is_counted_once_across_passes(monkeypatch):
    api = FakeApi(monkeypatch, [running_pod("old", phase="Failed", exitCode=1, finishedAt="2026-01-01T00:01:00Z"),
                                running_pod("new")])
    jobs = reconcile.JobStates()
    counter = metrics.RETRIES.labels(reason="TrainerError")
    before = counter._value.get()
    for _ in range(3):
        await reconcile.reconcile("team-a", "demo", SETTINGS, jobs)
    assert counter._value.get() == before + 1
    assert len(api.status_patches) == 1


async def test_a_failure_the_job_controller_ends_leaves_its_job_alone(monkeypatch):
    api = FakeApi(monkeypatch, [running_pod(phase="Failed", exitCode=2, message="bad", finishedAt="2026-01-01T00:01:00Z")])
    api.job["status"] = {"conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]}
    await reconcile.reconcile("team-a", "demo", SETTINGS, reconcile.JobStates())
    assert api.ftj["status"]["phase"] == "Failed" and api.deleted == []


async def test_a_waiting_reconcile_keeps_the_state_until_the_last_one_leaves():
    jobs = reconcile.JobStates()
    entered = asyncio.Event()

    async def first():
        async with jobs.hold("ns", "a") as state:
            entered.set()
            await asyncio.sleep(0.01)
            state.finished = True

    async def second():
        await entered.wait()
        async with jobs.hold("ns", "a") as state:
            assert ("ns", "a") in jobs  # the first one finished it, but this one still holds it
            state.finished = False  # e.g. a new job of the same name

    await asyncio.gather(first(), second())
    assert ("ns", "a") in jobs
    async with jobs.hold("ns", "a") as state:
        state.finished = True
    assert len(jobs) == 0


async def test_karpenter_events_come_only_from_the_jobs_own_pods(monkeypatch):
    """Events about the NodePool land in `default`, where anyone may write one; events about a
    pod name whose UID is not the current pod's are another pod's (or forged): neither counts."""
    def event(namespace, kind, name, uid, reason):
        return {"metadata": {"namespace": namespace}, "involvedObject": {"kind": kind, "name": name, "uid": uid},
                "reason": reason, "message": "m", "source": {"component": "karpenter"}}

    ftj = make_job()
    ns = ftj.metadata.namespace
    events = [event("default", "NodePool", "finetune-uid-1", "pool-uid", "NoCompatibleInstanceTypes"),
              event(ns, "Pod", "demo-trainer-0", "old-pod-uid", "NoCompatibleInstanceTypes"),
              event(ns, "Pod", "demo-trainer-0", "pod-uid", "FailedScheduling")]
    asked = []

    async def list_(kind, namespace, selector=None, fields=None):
        asked.append(namespace)
        return [e for e in events if e["metadata"]["namespace"] == namespace
                and all(e["involvedObject"][k.split(".")[1]] == v for k, v in (fields or {}).items())]

    monkeypatch.setattr(kube, "list_", list_)
    pods = [{"metadata": {"name": "demo-trainer-0", "uid": "pod-uid"}}]
    assert await reconcile._karpenter_events(ftj, pods) == (status.KarpenterEvent("FailedScheduling", "m"),)
    assert "default" not in asked


async def test_pool_readiness_is_read_from_the_jobs_own_pool(monkeypatch):
    ftj = make_job(nodePool={"provisioner": "karpenter"})
    ready = {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:10Z"}
    pool = {"metadata": {"labels": {"finetune.ai/job-uid": ftj.metadata.uid}}, "status": {"conditions": [ready]}}

    async def get(kind, namespace, name):
        assert (kind, namespace, name) == ("NodePool", None, f"finetune-{ftj.metadata.uid}")
        return pool

    monkeypatch.setattr(kube, "get", get)
    assert await reconcile._pool_ready_since(ftj) == datetime(2026, 1, 1, 0, 0, 10, tzinfo=timezone.utc)
    ready["status"] = "False"
    assert await reconcile._pool_ready_since(ftj) is None
    ready["status"] = "True"
    pool["metadata"]["labels"]["finetune.ai/job-uid"] = "another-job"
    assert await reconcile._pool_ready_since(ftj) is None
