"""Live training progress: from the trainer's reports to FineTuneJob.status.progress.

The trainer POSTs its latest progress to the operator at
    /v1/namespaces/{namespace}/finetunejobs/{name}/progress
with a projected service-account token (audience `finetune.ai/progress`) that the kubelet binds
to the trainer pod. The operator asks the API server who the token belongs to (TokenReview):
a valid bound token names its pod, and only a pod controlled by the job's own trainer Job may
report for that job. Reports are buffered and written to the status at most once per interval
per job, so a fast trainer cannot flood the API server.

Why not let the trainer patch the status itself: that needs RBAC on finetunejobs/status, and a
Role cannot be narrowed to one object for a pod, so any trainer could write any job's status.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import httpx
import kr8s
from aiohttp import web
from cachetools import TLRUCache, TTLCache
from finetune_trainer.protocol import format_duration
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import kube, naming
from .api import TERMINAL_PHASES
from .guard import ClientBuckets, ThrottledLog, TokenBucket
from .kubetime import format_time
from .settings import OperatorSettings

log = logging.getLogger(__name__)

AUDIENCE = "finetune.ai/progress"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
MAX_COUNT = 2**53
CACHE_ENTRIES = 4096  # tokens and authorization decisions kept, each; far more than live trainer pods


class ProgressReport(BaseModel):
    """What a trainer sends (camelCase JSON). Non-finite floats are accepted (a diverged loss is
    NaN) and left out of the status, whose JSON cannot hold them; counts stay within what a JSON
    number holds exactly."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")
    step: int = Field(ge=0, le=MAX_COUNT)
    total_steps: int = Field(ge=1, le=MAX_COUNT, alias="totalSteps")
    loss: float | None = None
    tokens_per_second: float | None = Field(default=None, ge=0, alias="tokensPerSecond")
    eta: float | None = Field(default=None, ge=0, description="seconds left")
    # The run's shape, chosen by the trainer when the spec says auto (absent from older trainers).
    global_batch_size: int | None = Field(default=None, ge=1, le=MAX_COUNT, alias="globalBatchSize")
    epochs: int | None = Field(default=None, ge=1, le=MAX_COUNT)


def format_eta(seconds: float | None) -> str | None:
    """status.progress.eta: the trainer's own duration format, or None (no ETA shown)."""
    if seconds is None or not math.isfinite(seconds):
        return None
    return format_duration(seconds)


def status_progress(report: ProgressReport, now: datetime | None = None) -> dict[str, Any]:
    """The status.progress object for a report."""
    now = now or datetime.now(timezone.utc)
    out: dict[str, Any] = {
        "step": report.step,
        "totalSteps": report.total_steps,
        "percent": min(100, int(100 * report.step / report.total_steps)),
        "updatedAt": format_time(now),
    }
    if report.loss is not None and math.isfinite(report.loss):
        out["loss"] = round(report.loss, 6)
    if report.tokens_per_second is not None and math.isfinite(report.tokens_per_second):
        out["tokensPerSecond"] = round(report.tokens_per_second, 1)
    eta = format_eta(report.eta)
    if eta:
        out["eta"] = eta
    if report.global_batch_size is not None:
        out["globalBatchSize"] = report.global_batch_size
    if report.epochs is not None:
        out["epochs"] = report.epochs
    return out


def pod_belongs_to_job(pod: dict, job_name: str, trainer_job: dict | None, ftj_uid: str) -> bool:
    """A pod may report for a FineTuneJob only if the job's trainer Job controls it."""
    if trainer_job is None:
        return False
    owner = next((o for o in pod["metadata"].get("ownerReferences", []) if o.get("controller")), None)
    job_owner = next((o for o in trainer_job["metadata"].get("ownerReferences", []) if o.get("controller")), None)
    return (
        owner is not None and owner.get("kind") == "Job" and owner.get("uid") == trainer_job["metadata"]["uid"]
        and job_owner is not None and job_owner.get("uid") == ftj_uid
        and pod["metadata"].get("labels", {}).get(naming.JOB_LABEL) == job_name
    )


@dataclass
class ProgressBuffer:
    """Latest report per job, flushed to the API server at most once per `interval`."""

    interval: float = 5.0
    pending: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    last_write: dict[tuple[str, str], float] = field(default_factory=dict)

    def put(self, namespace: str, name: str, progress: dict[str, Any]) -> None:
        self.pending[(namespace, name)] = progress

    def due(self, now: float) -> list[tuple[tuple[str, str], dict[str, Any]]]:
        ready = [(key, value) for key, value in self.pending.items()
                 if now - self.last_write.get(key, 0.0) >= self.interval]
        for key, _ in ready:
            del self.pending[key]
            self.last_write[key] = now
        return ready

    async def flush_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for (namespace, name), progress in self.due(time.monotonic()):
                try:
                    ftj = await kube.get("FineTuneJob", namespace, name)
                    if ftj and ftj.get("status", {}).get("phase") not in TERMINAL_PHASES:
                        await kube.patch_status("FineTuneJob", namespace, name, {"progress": progress})
                except Exception as exc:  # keep serving; the next report retries
                    log.warning("could not write progress of %s/%s: %s", namespace, name, exc)
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass


async def _review(token: str) -> dict | None:
    """TokenReview: the authenticated identity behind a token, or None."""
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
              "spec": {"token": token, "audiences": [AUDIENCE]}}
    result = await kube.post("TokenReview", None, review)
    status = (result or {}).get("status", {})
    # An empty status.audiences on an authenticated token means "valid for the API server's own
    # audience" (the TokenReview API's contract), not for ours: refuse it.
    if not status.get("authenticated") or AUDIENCE not in (status.get("audiences") or []):
        return None
    return status.get("user")


@dataclass(frozen=True)
class PodIdentity:
    namespace: str
    name: str
    uid: str


def pod_identity(user: dict | None) -> PodIdentity | None:
    """The pod a reviewed token is bound to (system:serviceaccount:<ns>:<sa> plus the pod extras)."""
    extra = (user or {}).get("extra", {})
    parts = (user or {}).get("username", "").split(":")
    if not extra.get(POD_NAME_EXTRA) or len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
        return None
    return PodIdentity(parts[2], extra[POD_NAME_EXTRA][0], (extra.get(POD_UID_EXTRA) or [""])[0])


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


def make_app(buffer: ProgressBuffer, settings: OperatorSettings) -> web.Application:
    """The progress endpoint. Work it does for a client (a TokenReview, three reads to authorize a
    pod) is cached and rate-limited, so a client with bogus tokens or job names costs little."""
    # sha256(token) -> the pod it is bound to (60 s), or None for a refused token (10 s).
    identities: TLRUCache[str, PodIdentity | None] = TLRUCache(
        maxsize=CACHE_ENTRIES, ttu=lambda _key, value, now: now + (60 if value else 10))
    # (pod uid, namespace, job) -> may that pod report for that job (30 s).
    decisions: TTLCache[tuple[str, str, str], bool] = TTLCache(maxsize=CACHE_ENTRIES, ttl=30)
    reviews = TokenBucket(settings.progress_reviews_per_second, 2 * settings.progress_reviews_per_second)
    per_client = ClientBuckets(settings.progress_lookups_per_client_per_second,
                               4 * settings.progress_lookups_per_client_per_second)
    warn = ThrottledLog(log)

    async def identify(token: str, client: str) -> PodIdentity | None | web.Response:
        key = hashlib.sha256(token.encode()).hexdigest()
        if key in identities:
            return identities[key]
        if not per_client.take(client) or not reviews.take():
            warn.warning("throttled", "progress endpoint: throttling token reviews (client %s)", client)
            return _error(429, "too many unknown tokens; retry later", **{"Retry-After": "5"})
        identities[key] = identity = pod_identity(await _review(token))
        return identity

    async def authorized(pod: PodIdentity, namespace: str, name: str, client: str) -> bool | web.Response:
        key = (pod.uid, namespace, name)
        if key in decisions:
            return decisions[key]
        if not per_client.take(client):
            warn.warning("throttled", "progress endpoint: throttling authorization reads (client %s)", client)
            return _error(429, "too many requests; retry later", **{"Retry-After": "5"})
        ftj = await kube.get("FineTuneJob", namespace, name)
        found = await kube.get("Pod", namespace, pod.name)
        trainer = await kube.get("Job", namespace, naming.trainer_job_name(name)) if ftj else None
        decisions[key] = allowed = bool(
            ftj and found and found["metadata"]["uid"] == pod.uid
            and pod_belongs_to_job(found, name, trainer, ftj["metadata"]["uid"]))
        return allowed

    async def handle(request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        if not (naming.is_dns_label(namespace) and naming.is_dns_label(name)):
            return _error(404, "no such job")
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not header.removeprefix("Bearer ").strip():
            return _error(401, "missing bearer token")
        client = request.remote or ""
        identity = await identify(header.removeprefix("Bearer ").strip(), client)
        if isinstance(identity, web.Response):
            return identity
        if identity is None:
            warn.warning("bad-token", "rejected progress for %s/%s: not a valid pod-bound token", namespace, name)
            return _error(401, "token is not a pod-bound token for this audience")
        if identity.namespace != namespace:
            warn.warning("other-namespace", "rejected progress for %s/%s from pod %s/%s: other namespace",
                         namespace, name, identity.namespace, identity.name)
            return _error(403, "forbidden")
        allowed = await authorized(identity, namespace, name, client)
        if isinstance(allowed, web.Response):
            return allowed
        if not allowed:
            warn.warning("not-trainer", "rejected progress for %s/%s from pod %s/%s: not one of its trainer pods",
                         namespace, name, identity.namespace, identity.name)
            return _error(403, "forbidden: not a trainer pod of this job")
        try:
            body = ProgressReport.model_validate_json(await request.read())
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(part) for part in problem["loc"]) or "body"
            return _error(400, f"invalid progress: {where}: {problem['msg']}")
        buffer.put(namespace, name, status_progress(body))
        return web.json_response({"accepted": True}, status=202)

    async def report(request: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(settings.progress_request_timeout_seconds):
                return await handle(request)
        except TimeoutError:
            return _error(408, "request took too long")
        except (kr8s.ServerError, OSError, httpx.HTTPError) as exc:
            warn.warning("api-error", "progress endpoint: the API server did not answer: %s", exc)
            return _error(503, "cannot check the token now; retry later")

    app = web.Application(client_max_size=64 * 1024)
    app.router.add_post("/v1/namespaces/{namespace}/finetunejobs/{name}/progress", report)
    return app
