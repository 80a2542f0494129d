"""The progress endpoint's decisions, without a cluster: which pod may report for which job, what
each refusal answers, what a report becomes in the status, and when the buffer writes it.

The Kubernetes API is replaced as in test_progress_endpoint.py: `progress._review` (or
`progress.kube.post` for the TokenReview itself) and `progress.kube.get`/`patch_status`. The
endpoint is the real aiohttp application from `progress.make_app`, served on a local port; its
caches get an injected clock where a test needs their expiry, so no test waits them out."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import socket
import time
from datetime import datetime, timezone

import aiohttp
import httpx
import kr8s
import pytest
from aiohttp import ClientSession, ClientTimeout, web
from cachetools import TLRUCache, TTLCache

from finetune_operator import progress
from finetune_operator.progress import (
    MAX_COUNT, PodIdentity, ProgressBuffer, ProgressReport, format_eta, pod_belongs_to_job, pod_identity,
    status_progress)
from finetune_operator.settings import OperatorSettings

NOW = datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- what a report may hold ---------------------------------------------------------------------

def test_counts_up_to_the_largest_exact_json_integer_are_accepted():
    report = ProgressReport.model_validate_json(f'{{"step": {2**53}, "totalSteps": {2**53}}}')
    assert MAX_COUNT == 2**53 and report.step == 2**53 and report.total_steps == 2**53
    with pytest.raises(ValueError):
        ProgressReport.model_validate_json(f'{{"step": 1, "totalSteps": {2**53 + 1}}}')
    with pytest.raises(ValueError):
        ProgressReport.model_validate_json(f'{{"step": {2**53 + 1}, "totalSteps": 1}}')


def test_the_smallest_valid_report_and_its_bounds():
    report = ProgressReport.model_validate_json('{"step": 0, "totalSteps": 1, "tokensPerSecond": 0, "eta": 0}')
    assert (report.step, report.total_steps, report.loss, report.tokens_per_second, report.eta) == (0, 1, None, 0, 0)
    bare = ProgressReport.model_validate_json('{"step": 0, "totalSteps": 1}')
    assert (bare.loss, bare.tokens_per_second, bare.eta) == (None, None, None)
    for bad in ('{"step": -1, "totalSteps": 1}', '{"step": 0, "totalSteps": 0}',
                '{"step": 0, "totalSteps": 1, "tokensPerSecond": -0.5}', '{"step": 0, "totalSteps": 1, "eta": -1}'):
        with pytest.raises(ValueError):
            ProgressReport.model_validate_json(bad)


def test_a_report_reads_camel_case_and_field_names_and_ignores_extra_keys():
    report = ProgressReport.model_validate_json(
        '{"step": 2, "totalSteps": 8, "loss": -1.5, "tokensPerSecond": 3.25, "eta": 7, "epoch": 1}')
    assert (report.step, report.total_steps, report.loss, report.tokens_per_second, report.eta) == (2, 8, -1.5, 3.25, 7)
    by_name = ProgressReport.model_validate({"step": 2, "total_steps": 8, "tokens_per_second": 1.0})
    assert by_name.total_steps == 8 and by_name.tokens_per_second == 1.0


def test_the_run_shape_a_trainer_reports_reaches_the_status_and_older_trainers_omit_it():
    shaped = ProgressReport.model_validate_json('{"step": 2, "totalSteps": 8, "globalBatchSize": 4, "epochs": 16}')
    progress = status_progress(shaped)
    assert (progress["globalBatchSize"], progress["epochs"]) == (4, 16)
    assert {"globalBatchSize", "epochs"}.isdisjoint(status_progress(ProgressReport(step=2, totalSteps=8)))
    for bad in ('{"step": 0, "totalSteps": 1, "globalBatchSize": 0}', '{"step": 0, "totalSteps": 1, "epochs": 0}'):
        with pytest.raises(ValueError):
            ProgressReport.model_validate_json(bad)


# --- what a report becomes in the status ---------------------------------------------------------

def test_format_eta_uses_the_trainer_duration_format():
    assert format_eta(None) is None
    assert format_eta(float("inf")) is None and format_eta(float("nan")) is None
    assert format_eta(0) == "0s" and format_eta(45) == "45s" and format_eta(750) == "12m30s"
    assert format_eta(3720) == "1h02m"


def test_status_progress_holds_every_field_rounded():
    report = ProgressReport(step=3, total_steps=7, loss=0.12345678, tokens_per_second=1234.567, eta=750)
    assert status_progress(report, now=NOW) == {
        "step": 3, "totalSteps": 7, "percent": 42, "updatedAt": "2026-03-04T05:06:07Z",
        "loss": 0.123457, "tokensPerSecond": 1234.6, "eta": "12m30s"}


def test_status_progress_leaves_out_what_the_report_lacks():
    out = status_progress(ProgressReport(step=0, total_steps=3), now=NOW)
    assert out == {"step": 0, "totalSteps": 3, "percent": 0, "updatedAt": "2026-03-04T05:06:07Z"}


def test_status_progress_keeps_zero_values_and_an_eta_of_zero():
    out = status_progress(ProgressReport(step=1, total_steps=3, loss=0.0, tokens_per_second=0.0, eta=0), now=NOW)
    assert out["loss"] == 0.0 and out["tokensPerSecond"] == 0.0 and out["eta"] == "0s" and out["percent"] == 33


def test_percent_is_rounded_down_and_capped_at_100():
    def percent(step, total):
        return status_progress(ProgressReport(step=step, total_steps=total), now=NOW)["percent"]
    assert percent(199, 200) == 99 and percent(200, 200) == 100 and percent(1, 3) == 33
    assert percent(500, 200) == 100  # a trainer that runs past its plan


def test_status_progress_stamps_the_current_time_by_default():
    before = datetime.now(timezone.utc).replace(microsecond=0)
    stamp = status_progress(ProgressReport(step=1, total_steps=2))["updatedAt"]
    after = datetime.now(timezone.utc)
    moment = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert before <= moment <= after


# --- which pod belongs to which job --------------------------------------------------------------

def _pod(owner_uid="uid-job", kind="Job", controller=True, label="demo", owners=None):
    metadata = {"uid": "uid-p1", "labels": {"finetune.ai/job": label} if label is not None else {}}
    if owners is None:
        owners = [{"controller": controller, "kind": kind, "uid": owner_uid}]
    metadata["ownerReferences"] = owners
    return {"metadata": metadata}


def _job(owner_uid="uid-ftj", controller=True, owners=None):
    if owners is None:
        owners = [{"controller": controller, "uid": owner_uid}]
    return {"metadata": {"uid": "uid-job", "ownerReferences": owners}}


def test_a_pod_of_the_trainer_job_belongs_to_its_job():
    assert pod_belongs_to_job(_pod(), "demo", _job(), "uid-ftj") is True


@pytest.mark.parametrize("pod, job, why", [
    (_pod(), None, "no trainer Job"),
    (_pod(owner_uid="uid-other-job"), _job(), "another Job controls the pod"),
    (_pod(kind="ReplicaSet"), _job(), "the controller is no Job"),
    (_pod(controller=False), _job(), "the Job owns the pod without controlling it"),
    (_pod(owners=[]), _job(), "no owners"),
    (_pod(label="other"), _job(), "labelled for another job"),
    (_pod(label=None), _job(), "no job label"),
    (_pod(), _job(owner_uid="uid-other-ftj"), "the trainer Job belongs to another FineTuneJob"),
    (_pod(), _job(controller=False), "the trainer Job is not controlled by the FineTuneJob"),
    (_pod(), _job(owners=[]), "the trainer Job has no owner"),
])
def test_other_pods_do_not_belong_to_the_job(pod, job, why):
    assert pod_belongs_to_job(pod, "demo", job, "uid-ftj") is False, why


def test_the_controller_is_found_among_several_owners():
    pod = _pod(owners=[{"kind": "Job", "uid": "uid-other"}, {"controller": True, "kind": "Job", "uid": "uid-job"}])
    job = _job(owners=[{"uid": "uid-x"}, {"controller": True, "uid": "uid-ftj"}])
    assert pod_belongs_to_job(pod, "demo", job, "uid-ftj") is True


def test_objects_without_owner_references_or_labels_do_not_belong():
    bare_pod = {"metadata": {"uid": "uid-p1"}}
    assert pod_belongs_to_job(bare_pod, "demo", _job(), "uid-ftj") is False
    bare_job = {"metadata": {"uid": "uid-job"}}
    assert pod_belongs_to_job(_pod(), "demo", bare_job, "uid-ftj") is False
    unlabelled = {"metadata": {"uid": "uid-p1", "ownerReferences": _pod()["metadata"]["ownerReferences"]}}
    assert pod_belongs_to_job(unlabelled, "demo", _job(), "uid-ftj") is False


# --- the identity behind a token -----------------------------------------------------------------

def _user(username="system:serviceaccount:team-a:trainer-sa", name=("p1",), uid=("uid-p1",)):
    extra = {}
    if name is not None:
        extra[POD_NAME] = list(name)
    if uid is not None:
        extra[POD_UID] = list(uid)
    return {"username": username, "extra": extra}


def test_pod_identity_reads_the_namespace_pod_and_uid():
    assert progress.POD_NAME_EXTRA == POD_NAME and progress.POD_UID_EXTRA == POD_UID
    assert pod_identity(_user()) == PodIdentity("team-a", "p1", "uid-p1")


def test_pod_identity_without_a_uid_has_an_empty_uid():
    assert pod_identity(_user(uid=None)) == PodIdentity("team-a", "p1", "")
    assert pod_identity(_user(uid=())) == PodIdentity("team-a", "p1", "")


@pytest.mark.parametrize("user", [
    None, {}, _user(name=None), _user(name=()),
    _user(username="system:serviceaccount:team-a"),
    _user(username="system:serviceaccount:team-a:sa:more"),
    _user(username="system:node:team-a:sa"),
    _user(username="other:serviceaccount:team-a:sa"),
    {"extra": {POD_NAME: ["p1"]}},
])
def test_tokens_not_bound_to_a_pod_have_no_identity(user):
    assert pod_identity(user) is None


class FakeApiPost:
    def __init__(self, answer):
        self.answer, self.calls = answer, []

    async def __call__(self, kind, namespace, body):
        self.calls.append((kind, namespace, body))
        return self.answer


def test_token_review_asks_for_our_audience_and_returns_the_user(monkeypatch):
    user = _user()
    api = FakeApiPost({"status": {"authenticated": True, "audiences": ["other", "finetune.ai/progress"], "user": user}})
    monkeypatch.setattr(progress.kube, "post", api)
    assert asyncio.run(progress._review("tok")) == user
    assert api.calls == [("TokenReview", None, {
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "spec": {"token": "tok", "audiences": ["finetune.ai/progress"]}})]


@pytest.mark.parametrize("answer", [
    None, {}, {"status": {}},
    {"status": {"authenticated": False, "audiences": ["finetune.ai/progress"], "user": {"username": "x"}}},
    {"status": {"audiences": ["finetune.ai/progress"], "user": {"username": "x"}}},
    {"status": {"authenticated": True, "audiences": ["other"], "user": {"username": "x"}}},
    {"status": {"authenticated": True, "user": {"username": "x"}}},
    {"status": {"authenticated": True, "audiences": None, "user": {"username": "x"}}},
])
def test_token_review_refusals(monkeypatch, answer):
    monkeypatch.setattr(progress.kube, "post", FakeApiPost(answer))
    assert asyncio.run(progress._review("tok")) is None


# --- the buffer: what is written when ------------------------------------------------------------

def test_the_default_interval_is_five_seconds():
    buffer = ProgressBuffer()
    assert buffer.interval == 5.0
    buffer.put("ns", "a", {"step": 1})
    assert buffer.due(4.9) == []  # nothing written yet: as if written at 0
    assert buffer.due(5.0) == [(("ns", "a"), {"step": 1})]


def test_reports_are_written_at_most_once_per_interval_per_job():
    buffer = ProgressBuffer(interval=5)
    buffer.put("ns", "a", {"step": 1})
    assert buffer.due(100.0) == [(("ns", "a"), {"step": 1})]
    assert buffer.pending == {} and buffer.last_write == {("ns", "a"): 100.0}
    assert buffer.due(101.0) == []  # nothing new
    buffer.put("ns", "a", {"step": 2})
    buffer.put("ns", "a", {"step": 3})
    assert buffer.due(104.9) == []  # too soon: held, not dropped
    assert buffer.pending == {("ns", "a"): {"step": 3}}
    assert buffer.due(105.0) == [(("ns", "a"), {"step": 3})]  # exactly one interval later
    assert buffer.last_write[("ns", "a")] == 105.0 and buffer.due(200.0) == []


def test_jobs_are_coalesced_separately():
    buffer = ProgressBuffer(interval=5)
    buffer.put("ns", "a", {"step": 1})
    assert buffer.due(100.0) == [(("ns", "a"), {"step": 1})]
    buffer.put("ns", "a", {"step": 2})
    buffer.put("ns", "b", {"step": 7})
    buffer.put("other", "a", {"step": 9})
    assert buffer.due(102.0) == [(("ns", "b"), {"step": 7}), (("other", "a"), {"step": 9})]
    assert buffer.pending == {("ns", "a"): {"step": 2}}
    assert buffer.due(105.0) == [(("ns", "a"), {"step": 2})]


class FakeStatusApi:
    """kube.get / kube.patch_status over a table of FineTuneJobs."""

    def __init__(self, jobs):
        self.jobs, self.gets, self.patches = jobs, [], []
        self.patched = asyncio.Event()

    async def get(self, kind, namespace, name):
        self.gets.append((kind, namespace, name))
        value = self.jobs.get((kind, namespace, name))
        if isinstance(value, Exception):
            raise value
        return value

    async def patch_status(self, kind, namespace, name, status):
        self.patches.append((kind, namespace, name, status))
        self.patched.set()


async def running_until(task, condition, within=30.0):
    """Wait for `condition` while `task` (the flush loop) keeps running; it must not return first."""
    deadline = time.monotonic() + within
    while not condition():
        assert not task.done(), "the flush loop returned before it was stopped"
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def _flush_once(monkeypatch, jobs, pending, until=None):
    api = FakeStatusApi(jobs)
    monkeypatch.setattr(progress.kube, "get", api.get)
    monkeypatch.setattr(progress.kube, "patch_status", api.patch_status)
    buffer = ProgressBuffer(interval=5)
    for (namespace, name), value in pending.items():
        buffer.put(namespace, name, value)
    stop = asyncio.Event()
    task = asyncio.create_task(buffer.flush_forever(stop))
    await running_until(task, lambda: len(api.gets) >= len(pending) and (until is None or until(api)))
    stop.set()
    await asyncio.wait_for(task, timeout=30)
    return api, buffer


async def test_flush_writes_the_progress_of_a_running_job(monkeypatch):
    jobs = {("FineTuneJob", "ns", "demo"): {"metadata": {}, "status": {"phase": "Running"}}}
    api, buffer = await _flush_once(monkeypatch, jobs, {("ns", "demo"): {"step": 4}})
    assert api.gets == [("FineTuneJob", "ns", "demo")]
    assert api.patches == [("FineTuneJob", "ns", "demo", {"progress": {"step": 4}})]
    assert buffer.pending == {}


async def test_flush_writes_a_job_that_has_no_status_yet(monkeypatch):
    jobs = {("FineTuneJob", "ns", "demo"): {"metadata": {}}}
    api, _ = await _flush_once(monkeypatch, jobs, {("ns", "demo"): {"step": 1}})
    assert api.patches == [("FineTuneJob", "ns", "demo", {"progress": {"step": 1}})]


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
async def test_flush_leaves_a_finished_job_alone(monkeypatch, phase):
    jobs = {("FineTuneJob", "ns", "demo"): {"metadata": {}, "status": {"phase": phase}}}
    api, buffer = await _flush_once(monkeypatch, jobs, {("ns", "demo"): {"step": 4}})
    assert api.gets == [("FineTuneJob", "ns", "demo")] and api.patches == [] and buffer.pending == {}


async def test_flush_skips_a_deleted_job_and_survives_api_errors(monkeypatch):
    jobs = {("FineTuneJob", "ns", "broken"): OSError("connection refused"),
            ("FineTuneJob", "ns", "live"): {"metadata": {}, "status": {"phase": "Running"}}}
    pending = {("ns", "broken"): {"step": 1}, ("ns", "gone"): {"step": 2}, ("ns", "live"): {"step": 3}}

    api, _ = await _flush_once(monkeypatch, jobs, pending, until=lambda api: api.patched.is_set())
    assert sorted(api.gets) == [("FineTuneJob", "ns", "broken"), ("FineTuneJob", "ns", "gone"),
                                ("FineTuneJob", "ns", "live")]
    assert api.patches == [("FineTuneJob", "ns", "live", {"progress": {"step": 3}})]


async def test_flush_keeps_going_after_an_error_and_stops_when_told(monkeypatch):
    api = FakeStatusApi({("FineTuneJob", "ns", "demo"): {"metadata": {}, "status": {"phase": "Running"}}})
    failures = []

    async def flaky_patch(kind, namespace, name, status):
        if not failures:
            failures.append(status)
            raise kr8s.ServerError("conflict")
        await api.patch_status(kind, namespace, name, status)

    monkeypatch.setattr(progress.kube, "get", api.get)
    monkeypatch.setattr(progress.kube, "patch_status", flaky_patch)
    buffer = ProgressBuffer(interval=0)
    stop = asyncio.Event()
    task = asyncio.create_task(buffer.flush_forever(stop))
    buffer.put("ns", "demo", {"step": 1})
    await running_until(task, lambda: bool(failures))
    buffer.put("ns", "demo", {"step": 2})  # the next report retries
    await running_until(task, api.patched.is_set)
    assert failures == [{"progress": {"step": 1}}]
    assert api.patches == [("FineTuneJob", "ns", "demo", {"progress": {"step": 2}})]
    stop.set()
    await asyncio.wait_for(task, timeout=30)
    assert task.result() is None


async def test_flush_forever_returns_at_once_when_already_stopped(monkeypatch):
    api = FakeStatusApi({("FineTuneJob", "ns", "demo"): {"metadata": {}, "status": {}}})
    monkeypatch.setattr(progress.kube, "get", api.get)
    monkeypatch.setattr(progress.kube, "patch_status", api.patch_status)
    buffer = ProgressBuffer(interval=0)
    buffer.put("ns", "demo", {"step": 1})
    stop = asyncio.Event()
    stop.set()
    await asyncio.wait_for(buffer.flush_forever(stop), timeout=30)
    assert api.gets == [] and buffer.pending == {("ns", "demo"): {"step": 1}}


# --- the endpoint --------------------------------------------------------------------------------

TRAINER_OWNER = {"controller": True, "kind": "Job", "uid": "uid-job"}


def cluster_objects():
    """Namespace ns: FineTuneJob demo, its trainer Job, its trainer pod p1 and a pod p2 that is not
    one of them; FineTuneJob other with a trainer Job of its own (no pods of it here)."""
    return {
        ("FineTuneJob", "ns", "demo"): {"metadata": {"uid": "uid-ftj"}, "status": {}},
        ("Job", "ns", "demo-trainer"): {"metadata": {"uid": "uid-job",
                                                     "ownerReferences": [{"controller": True, "uid": "uid-ftj"}]}},
        ("Pod", "ns", "p1"): {"metadata": {"uid": "uid-p1", "ownerReferences": [TRAINER_OWNER],
                                           "labels": {"finetune.ai/job": "demo"}}},
        ("Pod", "ns", "p2"): {"metadata": {"uid": "uid-p2", "labels": {"finetune.ai/job": "demo"}}},
        ("FineTuneJob", "ns", "other"): {"metadata": {"uid": "uid-ftj-other"}, "status": {}},
        ("Job", "ns", "other-trainer"): {"metadata": {"uid": "uid-job-other",
                                                      "ownerReferences": [{"controller": True, "uid": "uid-ftj-other"}]}},
    }


def bound_user(namespace, pod, uid):
    return {"username": f"system:serviceaccount:{namespace}:default",
            "extra": {POD_NAME: [pod], POD_UID: [uid]}}


TOKENS = {
    "good": bound_user("ns", "p1", "uid-p1"),
    "p2": bound_user("ns", "p2", "uid-p2"),
    "stale": bound_user("ns", "p1", "uid-p1-before-restart"),
    "elsewhere": bound_user("ns2", "p1", "uid-p1"),
    "not-a-pod": {"username": "system:serviceaccount:ns:default", "extra": {}},
}


class Endpoint:
    def __init__(self, port, buffer, objects):
        self.port, self.buffer, self.objects = port, buffer, objects
        self.reviews: list[str] = []
        self.gets: list[tuple] = []

    async def review(self, token):
        self.reviews.append(token)
        return TOKENS.get(token)

    async def get(self, kind, namespace, name):
        self.gets.append((kind, namespace, name))
        return self.objects.get((kind, namespace, name))

    async def post(self, token="good", body='{"step": 1, "totalSteps": 2}', job="demo", namespace="ns",
                   authorization=None):
        headers = {"Authorization": authorization if authorization is not None else f"Bearer {token}"}
        async with ClientSession(timeout=ClientTimeout(total=60)) as session:
            async with session.post(
                    f"http://127.0.0.1:{self.port}/v1/namespaces/{namespace}/finetunejobs/{job}/progress",
                    data=body, headers=headers) as resp:
                text = await resp.text()
                return resp.status, (json.loads(text) if resp.content_type == "application/json" else text), resp.headers


@contextlib.asynccontextmanager
async def endpoint(monkeypatch, clock=None, **overrides):
    """`progress.make_app` on a local port, with generous limits unless told otherwise; `clock`,
    if given, is the caches' timer."""
    if clock is not None:
        monkeypatch.setattr(progress, "TLRUCache", functools.partial(TLRUCache, timer=clock))
        monkeypatch.setattr(progress, "TTLCache", functools.partial(TTLCache, timer=clock))
    limits = {"progress_reviews_per_second": 1000, "progress_lookups_per_client_per_second": 1000}
    settings = OperatorSettings(progress_port=free_port(), **{**limits, **overrides})
    buffer = ProgressBuffer(interval=5)
    ep = Endpoint(settings.progress_port, buffer, cluster_objects())
    monkeypatch.setattr(progress, "_review", ep.review)
    monkeypatch.setattr(progress.kube, "get", ep.get)
    runner = web.AppRunner(progress.make_app(buffer, settings), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", settings.progress_port)
    await site.start()
    try:
        yield ep
    finally:
        await runner.cleanup()


AUTH_READS = [("FineTuneJob", "ns", "demo"), ("Pod", "ns", "p1"), ("Job", "ns", "demo-trainer")]


async def test_a_trainer_report_is_accepted_and_buffered(monkeypatch):
    async with endpoint(monkeypatch) as ep:
        body = '{"step": 5, "totalSteps": 20, "loss": 1.25, "tokensPerSecond": 99.94, "eta": 90}'
        status, answer, _ = await ep.post(body=body)
        assert (status, answer) == (202, {"accepted": True})
        assert ep.reviews == ["good"] and ep.gets == AUTH_READS
        assert list(ep.buffer.pending) == [("ns", "demo")]
        written = dict(ep.buffer.pending[("ns", "demo")])
        assert written.pop("updatedAt").endswith("Z")
        assert written == {"step": 5, "totalSteps": 20, "percent": 25, "loss": 1.25,
                           "tokensPerSecond": 99.9, "eta": "1m30s"}
        # The next report replaces it; nothing is read again.
        assert (await ep.post(body='{"step": 6, "totalSteps": 20}'))[0] == 202
        assert ep.buffer.pending[("ns", "demo")]["step"] == 6 and ep.gets == AUTH_READS


@pytest.mark.parametrize("namespace, job", [("NS", "demo"), ("ns", "Demo"), ("ns", "a" * 64), ("n" * 64, "demo"),
                                            ("ns", "-demo"), ("ns.x", "demo")])
async def test_names_that_cannot_be_a_job_are_not_found(monkeypatch, namespace, job):
    async with endpoint(monkeypatch) as ep:
        status, answer, _ = await ep.post(namespace=namespace, job=job)
        assert (status, answer) == (404, {"error": "no such job"})
        assert ep.reviews == [] and ep.gets == []


@pytest.mark.parametrize("authorization", ["", "good", "Basic good", "Bearer", "Bearer ", "Bearer    ", "bearer good"])
async def test_a_request_without_a_bearer_token_is_unauthorized(monkeypatch, authorization):
    async with endpoint(monkeypatch) as ep:
        status, answer, _ = await ep.post(authorization=authorization)
        assert (status, answer) == (401, {"error": "missing bearer token"})
        assert ep.reviews == []


async def test_a_request_without_an_authorization_header_is_unauthorized(monkeypatch):
    async with endpoint(monkeypatch) as ep:
        async with ClientSession(timeout=ClientTimeout(total=60)) as session:
            async with session.post(f"http://127.0.0.1:{ep.port}/v1/namespaces/ns/finetunejobs/demo/progress",
                                    data='{"step": 1, "totalSteps": 2}') as resp:
                assert resp.status == 401 and await resp.json() == {"error": "missing bearer token"}
        assert ep.reviews == []


async def test_the_token_is_reviewed_without_the_scheme_and_surrounding_space(monkeypatch):
    async with endpoint(monkeypatch) as ep:
        status, _, _ = await ep.post(authorization="Bearer   good  ")
        assert status == 202 and ep.reviews == ["good"]


@pytest.mark.parametrize("token", ["bogus", "not-a-pod"])
async def test_a_token_not_bound_to_a_pod_is_unauthorized(monkeypatch, token):
    async with endpoint(monkeypatch) as ep:
        status, answer, _ = await ep.post(token=token)
        assert (status, answer) == (401, {"error": "token is not a pod-bound token for this audience"})
        assert ep.gets == [] and ep.buffer.pending == {}


async def test_a_pod_of_another_namespace_is_forbidden_without_any_read(monkeypatch):
    async with endpoint(monkeypatch) as ep:
        status, answer, _ = await ep.post(token="elsewhere")
        assert (status, answer) == (403, {"error": "forbidden"})
        assert ep.gets == [] and ep.buffer.pending == {}


async def test_a_pod_that_is_not_a_trainer_of_the_job_is_forbidden(monkeypatch):
    async with endpoint(monkeypatch) as ep:
        status, answer, _ = await ep.post(token="p2")
        assert (status, answer) == (403, {"error": "forbidden: not a trainer pod of this job"})
        assert ep.buffer.pending == {}


async def test_a_token_of_an_earlier_pod_of_the_same_name_is_forbidden(monkeypatch):
    async with endpoint(monkeypatch) as ep:
        status, answer, _ = await ep.post(token="stale")
        assert (status, answer) == (403, {"error": "forbidden: not a trainer pod of this job"})


async def test_a_trainer_pod_may_not_report_for_another_job(monkeypatch):
    async with endpoint(monkeypatch) as ep:
        assert (await ep.post(job="demo"))[0] == 202
        status, answer, _ = await ep.post(job="other")
        assert (status, answer) == (403, {"error": "forbidden: not a trainer pod of this job"})
        assert ep.gets[3:] == [("FineTuneJob", "ns", "other"), ("Pod", "ns", "p1"), ("Job", "ns", "other-trainer")]
        assert list(ep.buffer.pending) == [("ns", "demo")]


async def test_the_decision_for_one_pod_is_not_reused_for_another(monkeypatch):
    async with endpoint(monkeypatch) as ep:
        assert (await ep.post(token="good"))[0] == 202
        assert (await ep.post(token="p2"))[0] == 403
        assert (await ep.post(token="stale"))[0] == 403
        assert (await ep.post(token="good"))[0] == 202


async def test_a_report_for_a_missing_job_is_forbidden_without_reading_its_trainer_job(monkeypatch):
    async with endpoint(monkeypatch) as ep:
        status, answer, _ = await ep.post(job="missing")
        assert (status, answer) == (403, {"error": "forbidden: not a trainer pod of this job"})
        assert ep.gets == [("FineTuneJob", "ns", "missing"), ("Pod", "ns", "p1")]


async def test_a_missing_pod_or_trainer_job_is_forbidden(monkeypatch):
    async with endpoint(monkeypatch) as ep:
        del ep.objects[("Job", "ns", "demo-trainer")]
        assert (await ep.post())[0] == 403
    async with endpoint(monkeypatch) as ep:
        del ep.objects[("Pod", "ns", "p1")]
        assert (await ep.post())[0] == 403


async def test_refusals_are_cached_too(monkeypatch):
    async with endpoint(monkeypatch) as ep:
        for _ in range(3):
            assert (await ep.post(token="p2"))[0] == 403
            assert (await ep.post(token="bogus"))[0] == 401
        assert ep.reviews == ["p2", "bogus"] and len(ep.gets) == 3


async def test_a_malformed_report_gets_what_is_wrong_with_it(monkeypatch):
    async with endpoint(monkeypatch) as ep:
        assert (await ep.post(body='{"step": -1, "totalSteps": 2}'))[:2] == (
            400, {"error": "invalid progress: step: Input should be greater than or equal to 0"})
        assert (await ep.post(body='{"step": 1}'))[:2] == (400, {"error": "invalid progress: totalSteps: Field required"})
        status, answer, _ = await ep.post(body="not json")
        assert status == 400 and answer["error"].startswith("invalid progress: body: Invalid JSON")
        assert ep.buffer.pending == {}


async def test_a_report_over_64_kib_is_refused(monkeypatch):
    async with endpoint(monkeypatch) as ep:
        head = '{"step": 1, "totalSteps": 2}'
        assert (await ep.post(body=head + " " * (64 * 1024 - len(head))))[0] == 202
        assert (await ep.post(body=head + " " * (64 * 1024 + 1 - len(head))))[0] == 413


async def test_the_api_server_not_answering_is_a_503(monkeypatch):
    for error in (kr8s.ServerError("boom"), OSError("refused"), httpx.ConnectError("refused")):
        async with endpoint(monkeypatch) as ep:
            async def failing(token, error=error):
                raise error
            monkeypatch.setattr(progress, "_review", failing)
            status, answer, _ = await ep.post()
            assert (status, answer) == (503, {"error": "cannot check the token now; retry later"}), error
    async with endpoint(monkeypatch) as ep:
        async def failing_get(kind, namespace, name):
            raise OSError("refused")
        monkeypatch.setattr(progress.kube, "get", failing_get)
        assert (await ep.post())[:2] == (503, {"error": "cannot check the token now; retry later"})


async def test_a_request_that_takes_too_long_is_a_408(monkeypatch):
    async with endpoint(monkeypatch, progress_request_timeout_seconds=0.2) as ep:
        async def slow(token):
            await asyncio.sleep(3)
            return TOKENS["good"]
        monkeypatch.setattr(progress, "_review", slow)
        status, answer, _ = await ep.post()
        assert (status, answer) == (408, {"error": "request took too long"})


async def test_token_reviews_are_limited_per_client(monkeypatch):
    # Each client may make the server review 4 unknown tokens at once (4 x the per-second rate),
    # then one a second; the overall review budget is not what refuses them here.
    async with endpoint(monkeypatch, progress_lookups_per_client_per_second=1) as ep:
        started = time.monotonic()
        answers = [await ep.post(token=f"bogus-{i}") for i in range(8)]
        refilled = math.floor(time.monotonic() - started)
        codes = [status for status, _, _ in answers]
        assert 4 <= len(ep.reviews) <= 4 + refilled, (len(ep.reviews), refilled)
        assert codes[:4] == [401] * 4 and codes.count(401) == len(ep.reviews)
        refused = [(status, body, headers.get("Retry-After")) for status, body, headers in answers if status == 429]
        assert refused == [(429, {"error": "too many unknown tokens; retry later"}, "5")] * (8 - len(ep.reviews))


async def test_authorization_reads_are_limited_per_client(monkeypatch):
    # A burst of one: the token review takes it, so the reads to authorize the pod wait for the
    # next token (4 s away) unless the machine is that slow.
    async with endpoint(monkeypatch, progress_lookups_per_client_per_second=0.25) as ep:
        started = time.monotonic()
        status, answer, headers = await ep.post()
        if time.monotonic() - started < 4:
            assert (status, answer, headers.get("Retry-After")) == (
                429, {"error": "too many requests; retry later"}, "5")
            assert ep.reviews == ["good"] and ep.gets == [] and ep.buffer.pending == {}


async def test_a_known_token_costs_no_review_budget(monkeypatch):
    # Two reviews at once in all; once "good" is known, its reports take none of them.
    async with endpoint(monkeypatch, progress_reviews_per_second=1) as ep:
        assert [(await ep.post())[0] for _ in range(6)] == [202] * 6
        assert ep.reviews == ["good"]


async def test_known_identities_expire_after_a_minute_and_refusals_after_ten_seconds(monkeypatch):
    clock = Clock()
    async with endpoint(monkeypatch, clock=clock) as ep:
        assert (await ep.post(token="good"))[0] == 202 and (await ep.post(token="bogus"))[0] == 401
        clock.now += 9.5
        assert (await ep.post(token="good"))[0] == 202 and (await ep.post(token="bogus"))[0] == 401
        assert ep.reviews == ["good", "bogus"]
        clock.now += 1.0  # 10.5 s: the refusal is forgotten, the identity is not
        assert (await ep.post(token="bogus"))[0] == 401 and (await ep.post(token="good"))[0] == 202
        assert ep.reviews == ["good", "bogus", "bogus"]
        clock.now += 49.0  # 59.5 s
        assert (await ep.post(token="good"))[0] == 202 and ep.reviews == ["good", "bogus", "bogus"]
        clock.now += 1.0  # 60.5 s
        assert (await ep.post(token="good"))[0] == 202 and ep.reviews == ["good", "bogus", "bogus", "good"]


async def test_authorization_decisions_expire_after_thirty_seconds(monkeypatch):
    clock = Clock()
    async with endpoint(monkeypatch, clock=clock) as ep:
        assert (await ep.post())[0] == 202 and ep.gets == AUTH_READS
        clock.now += 29.5
        assert (await ep.post())[0] == 202 and ep.gets == AUTH_READS
        clock.now += 1.0  # 30.5 s: read again, and the pod has been replaced meanwhile
        ep.objects[("Pod", "ns", "p1")] = {"metadata": {"uid": "uid-p1-new", "ownerReferences": [TRAINER_OWNER],
                                                        "labels": {"finetune.ai/job": "demo"}}}
        assert (await ep.post())[:2] == (403, {"error": "forbidden: not a trainer pod of this job"})
        assert ep.gets == AUTH_READS * 2 and ep.reviews == ["good"]


def test_updated_at_is_utc_whatever_the_machine_time_zone(monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Kolkata")  # UTC+05:30, no daylight saving
    time.tzset()
    try:
        before = datetime.now(timezone.utc).replace(microsecond=0)
        stamp = status_progress(ProgressReport(step=1, total_steps=2))["updatedAt"]
        after = datetime.now(timezone.utc)
    finally:
        monkeypatch.undo()
        time.tzset()
    moment = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert before <= moment <= after


async def test_one_client_running_out_of_budget_does_not_refuse_another(monkeypatch):
    # Clients are told apart by address: 127.0.0.1 and 127.0.0.2 are both this machine.
    async with endpoint(monkeypatch, progress_lookups_per_client_per_second=0.25) as ep:
        url = f"http://127.0.0.1:{ep.port}/v1/namespaces/ns/finetunejobs/demo/progress"

        async def post_from(address, token):
            connector = aiohttp.TCPConnector(local_addr=(address, 0))
            async with ClientSession(connector=connector, timeout=ClientTimeout(total=60)) as session:
                async with session.post(url, data='{"step": 1, "totalSteps": 2}',
                                        headers={"Authorization": f"Bearer {token}"}) as resp:
                    return resp.status

        started = time.monotonic()
        first = [await post_from("127.0.0.1", "bogus-1"), await post_from("127.0.0.1", "bogus-2")]
        other = await post_from("127.0.0.2", "bogus-3")
        assert first[0] == 401 and other == 401
        if time.monotonic() - started < 4:  # no refill of the one-token burst in between
            assert first[1] == 429 and ep.reviews == ["bogus-1", "bogus-3"]


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "finetune_operator.progress" and r.levelno == logging.WARNING]


async def test_each_refusal_is_logged_once_with_who_was_refused(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="finetune_operator.progress")
    async with endpoint(monkeypatch) as ep:
        for _ in range(3):  # the same reason again within a minute is counted, not written
            assert (await ep.post(token="bogus"))[0] == 401
            assert (await ep.post(token="elsewhere"))[0] == 403
            assert (await ep.post(token="p2"))[0] == 403
        assert _warnings(caplog) == [
            "rejected progress for ns/demo: not a valid pod-bound token",
            "rejected progress for ns/demo from pod ns2/p1: other namespace",
            "rejected progress for ns/demo from pod ns/p2: not one of its trainer pods"]
        async def failing(token):
            raise OSError("no route to host")
        monkeypatch.setattr(progress, "_review", failing)
        assert (await ep.post(token="new"))[0] == 503
        assert _warnings(caplog)[3:] == ["progress endpoint: the API server did not answer: no route to host"]


async def test_throttling_is_logged_with_the_client(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="finetune_operator.progress")
    async with endpoint(monkeypatch, progress_lookups_per_client_per_second=0.25) as ep:
        started = time.monotonic()
        statuses = [(await ep.post(token="bogus-1"))[0], (await ep.post(token="bogus-2"))[0]]
        if time.monotonic() - started < 4:
            assert statuses == [401, 429]
            assert _warnings(caplog)[1:] == ["progress endpoint: throttling token reviews (client 127.0.0.1)"]
    caplog.clear()
    async with endpoint(monkeypatch, progress_lookups_per_client_per_second=0.25) as ep:
        started = time.monotonic()
        first = (await ep.post())[0]
        second = (await ep.post(token="bogus"))[0]
        if time.monotonic() - started < 4:
            assert (first, second) == (429, 429)
            # Both are throttling: one line a minute for the two.
            assert _warnings(caplog) == ["progress endpoint: throttling authorization reads (client 127.0.0.1)"]


async def test_a_failed_status_write_is_logged(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="finetune_operator.progress")
    jobs = {("FineTuneJob", "ns", "broken"): OSError("connection refused")}
    await _flush_once(monkeypatch, jobs, {("ns", "broken"): {"step": 1}})
    assert _warnings(caplog) == ["could not write progress of ns/broken: connection refused"]
