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
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aiohttp import web
from finetune_trainer.protocol import format_duration
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import kube, naming
from .api import TERMINAL_PHASES
from .kubetime import format_time

log = logging.getLogger(__name__)

AUDIENCE = "finetune.ai/progress"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"


class ProgressReport(BaseModel):
    """What a trainer sends (camelCase JSON)."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")
    step: int = Field(ge=0)
    total_steps: int = Field(ge=1, alias="totalSteps")
    loss: float | None = None
    tokens_per_second: float | None = Field(default=None, ge=0, alias="tokensPerSecond")
    eta: float | None = Field(default=None, ge=0, description="seconds left")


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
    if report.tokens_per_second is not None:
        out["tokensPerSecond"] = round(report.tokens_per_second, 1)
    eta = format_eta(report.eta)
    if eta:
        out["eta"] = eta
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
    if not status.get("authenticated") or AUDIENCE not in (status.get("audiences") or [AUDIENCE]):
        return None
    return status.get("user")


def make_app(buffer: ProgressBuffer) -> web.Application:
    # Validated tokens, to spare a TokenReview per report: token -> (identity key, expiry).
    cache: dict[str, tuple[tuple[str, str, str], float]] = {}

    async def report(request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return web.json_response({"error": "missing bearer token"}, status=401)
        token = header.removeprefix("Bearer ").strip()
        cached = cache.get(token)
        if cached and cached[1] > time.monotonic():
            pod_ns, pod_name, pod_uid = cached[0]
        else:
            user = await _review(token)
            extra = (user or {}).get("extra", {})
            if not user or not extra.get(POD_NAME_EXTRA):
                log.warning("rejected progress for %s/%s: token is not a valid pod-bound token", namespace, name)
                return web.json_response({"error": "token is not a pod-bound token for this audience"}, status=401)
            pod_ns = user.get("username", "").split(":")[2] if user.get("username", "").count(":") >= 3 else ""
            pod_name, pod_uid = extra[POD_NAME_EXTRA][0], (extra.get(POD_UID_EXTRA) or [""])[0]
            cache[token] = ((pod_ns, pod_name, pod_uid), time.monotonic() + 60)
        if pod_ns != namespace:
            log.warning("rejected progress for %s/%s from pod %s/%s: other namespace", namespace, name, pod_ns, pod_name)
            return web.json_response({"error": "forbidden"}, status=403)
        ftj = await kube.get("FineTuneJob", namespace, name)
        pod = await kube.get("Pod", namespace, pod_name)
        trainer = await kube.get("Job", namespace, naming.trainer_job_name(name)) if ftj else None
        if not ftj or not pod or pod["metadata"]["uid"] != pod_uid or \
                not pod_belongs_to_job(pod, name, trainer, ftj["metadata"]["uid"]):
            log.warning("rejected progress for %s/%s from pod %s/%s: not one of its trainer pods",
                        namespace, name, pod_ns, pod_name)
            return web.json_response({"error": "forbidden: not a trainer pod of this job"}, status=403)
        try:
            body = ProgressReport.model_validate(await request.json())
        except (ValidationError, ValueError) as exc:
            return web.json_response({"error": f"invalid progress: {str(exc).splitlines()[0]}"}, status=400)
        buffer.put(namespace, name, status_progress(body))
        return web.json_response({"accepted": True}, status=202)

    app = web.Application(client_max_size=64 * 1024)
    app.router.add_post("/v1/namespaces/{namespace}/finetunejobs/{name}/progress", report)
    return app
