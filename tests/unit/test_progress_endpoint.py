"""The progress endpoint's bounds, without a cluster: connection caps, rate limits, bounded
caches, the TokenReview audience check and what a malformed report gets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import time

import pytest
from aiohttp import ClientSession

from finetune_operator import guard, progress
from finetune_operator.progress import ProgressBuffer, ProgressReport, status_progress
from finetune_operator.progress_server import serve
from finetune_operator.settings import OperatorSettings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_a_burst_then_the_rate():
    clock = Clock()
    bucket = guard.TokenBucket(rate=2, burst=4, clock=clock)
    assert [bucket.take() for _ in range(5)] == [True] * 4 + [False]
    clock.now += 1.0  # two more
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    clock.now += 100  # refills to the burst, not beyond
    assert sum(bucket.take() for _ in range(10)) == 4


def test_client_buckets_are_per_client_and_bounded():
    buckets = guard.ClientBuckets(rate=0.001, burst=1, max_clients=3)
    assert buckets.take("10.0.0.1") and not buckets.take("10.0.0.1")
    assert buckets.take("10.0.0.2")  # another client has its own bucket
    for i in range(10):
        buckets.take(f"10.0.1.{i}")
    assert len(buckets.buckets) == 3


def test_connection_limiter_caps_in_all_and_per_client():
    limiter = guard.ConnectionLimiter(max_connections=3, max_per_client=2)
    assert limiter.admit("a") and limiter.admit("a") and not limiter.admit("a")
    assert limiter.admit("b") and not limiter.admit("c")  # the total is reached
    limiter.release("a")
    assert limiter.admit("c") and limiter.total == 3 and limiter.refused == 2


def test_throttled_log_writes_one_line_per_reason_per_interval(caplog):
    clock = Clock()
    throttled = guard.ThrottledLog(logging.getLogger("t"), interval=60, clock=clock)
    with caplog.at_level(logging.WARNING):
        for _ in range(1000):
            throttled.warning("flood", "refused %s", "x")
        throttled.warning("other", "other reason")
        clock.now += 61
        throttled.warning("flood", "refused %s", "y")
    assert [r.getMessage() for r in caplog.records] == [
        "refused x", "other reason", "refused y (999 more like it since the last line)"]


def test_non_finite_numbers_never_reach_the_status():
    body = ProgressReport.model_validate_json('{"step": 3, "totalSteps": 10, "loss": NaN, '
                                              '"tokensPerSecond": Infinity, "eta": Infinity}')
    out = status_progress(body)
    assert "loss" not in out and "tokensPerSecond" not in out and "eta" not in out
    json.dumps(out, allow_nan=False)  # what the status patch needs


@pytest.mark.parametrize("body", ['{"step": 1}', '[1, 2]', '"step"', '{"step": 1e400, "totalSteps": 2}',
                                  '{"step": 9007199254740993, "totalSteps": 9007199254740993}', 'not json', '\xff'])
def test_malformed_reports_are_refused(body):
    with pytest.raises(ValueError):
        ProgressReport.model_validate_json(body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def running_endpoint(monkeypatch):
    """The real server (`progress_server.serve`) with small limits and a fake TokenReview that
    counts its calls and accepts the token "good" for pod p1 in namespace ns."""
    reviews: list[str] = []
    gets: list[tuple] = []

    async def review(token: str):
        reviews.append(token)
        if token == "good":
            return {"username": "system:serviceaccount:ns:default",
                    "extra": {progress.POD_NAME_EXTRA: ["p1"], progress.POD_UID_EXTRA: ["uid-p1"]}}
        return None

    async def get(kind, namespace, name):
        gets.append((kind, namespace, name))
        owner = {"controller": True, "kind": "Job", "uid": "uid-job"}
        return {
            "FineTuneJob": {"metadata": {"uid": "uid-ftj"}, "status": {}},
            "Pod": {"metadata": {"uid": "uid-p1", "ownerReferences": [owner], "labels": {"finetune.ai/job": "demo"}}},
            "Job": {"metadata": {"uid": "uid-job", "ownerReferences": [{"controller": True, "uid": "uid-ftj"}]}},
        }[kind] if name in ("demo", "p1", "demo-trainer") else None

    monkeypatch.setattr(progress, "_review", review)
    async def patch_status(kind, namespace, name, status):
        return {}

    monkeypatch.setattr(progress.kube, "get", get)
    monkeypatch.setattr(progress.kube, "patch_status", patch_status)  # the status writer's, when a report is due
    settings = OperatorSettings(progress_port=free_port(), progress_max_connections=6,
                                progress_max_connections_per_client=4, progress_header_timeout_seconds=0.5,
                                progress_reviews_per_second=2, progress_lookups_per_client_per_second=100)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop, host="127.0.0.1"))
    await asyncio.sleep(0.2)
    yield settings, reviews, gets
    stop.set()
    await task


def closed_by_server(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False  # open, nothing to read
    except ConnectionResetError:
        return True


async def post(port: int, token: str, body: str = '{"step": 1, "totalSteps": 2}', job: str = "demo") -> int:
    async with ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/v1/namespaces/ns/finetunejobs/{job}/progress",
                                data=body, headers={"Authorization": f"Bearer {token}"}) as resp:
            return resp.status


async def test_bogus_tokens_cost_a_bounded_number_of_token_reviews(monkeypatch):
    async with running_endpoint(monkeypatch) as endpoint:
        settings, reviews, _ = endpoint
        started = time.monotonic()
        codes = [await post(settings.progress_port, f"bogus-{i}") for i in range(30)]
        # The burst (4), then refused at once; a busy machine may let the bucket refill a token
        # or two (2 a second) while the 30 requests run, never more.
        refilled = math.floor((time.monotonic() - started) * settings.progress_reviews_per_second)
        assert 4 <= len(reviews) <= 4 + refilled, (len(reviews), refilled)
        assert codes.count(401) == len(reviews) and codes.count(429) == 30 - len(reviews), codes
        # The same bogus token again is answered from the cache, with no review.
        await asyncio.sleep(0.6)
        reviewed = len(reviews)
        assert await post(settings.progress_port, "bogus-0") == 401 and len(reviews) == reviewed


async def test_a_valid_token_is_reviewed_and_authorized_once(monkeypatch):
    async with running_endpoint(monkeypatch) as endpoint:
        settings, reviews, gets = endpoint
        assert [await post(settings.progress_port, "good") for _ in range(5)] == [202] * 5
        # Authorized once: one read of the pod and its Job (the FineTuneJob is also read by the
        # status writer when a report is due, so its count depends on timing).
        assert reviews == ["good"]
        assert gets.count(("Pod", "ns", "p1")) == 1 and gets.count(("Job", "ns", "demo-trainer")) == 1, gets
        assert await post(settings.progress_port, "good", body='{"step": -1, "totalSteps": 2}') == 400
        assert await post(settings.progress_port, "good", job="..") == 404


async def test_connections_over_the_caps_are_closed_and_half_open_ones_time_out(monkeypatch):
    async with running_endpoint(monkeypatch) as endpoint:
        settings, _, _ = endpoint
        held = []
        for _ in range(8):
            s = socket.create_connection(("127.0.0.1", settings.progress_port))
            s.sendall(b"POST /v1/namespaces/ns/finetunejobs/demo/progress HTTP/1.1\r\nHost: x\r\n")  # never ends
            held.append(s)
        await asyncio.sleep(0.2)
        # Over the per-client cap of 4, connections are closed as they are accepted.
        assert [closed_by_server(s) for s in held].count(True) == 4
        # The rest are dropped once the header timeout passes; then a real report gets through.
        await asyncio.sleep(1.0)
        assert all(closed_by_server(s) for s in held)
        for s in held:
            s.close()
        assert await post(settings.progress_port, "good") == 202


def test_an_empty_audience_list_is_not_ours(monkeypatch):
    async def post_review(kind, namespace, body):
        return {"status": {"authenticated": True, "audiences": [],
                           "user": {"username": "system:serviceaccount:ns:default"}}}
    monkeypatch.setattr(progress.kube, "post", post_review)
    assert asyncio.run(progress._review("t")) is None


def test_buffer_keeps_only_the_latest_report_per_job():
    buffer = ProgressBuffer(interval=5)
    for step in range(100):
        buffer.put("ns", "demo", {"step": step})
    assert buffer.due(10.0) == [(("ns", "demo"), {"step": 99})] and buffer.due(12.0) == []
