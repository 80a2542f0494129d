"""`kubectl finetune list | status | watch | logs`: FineTuneJobs in a cluster, through the API
server (the current kubeconfig context), with the operator's own Kubernetes helpers."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from finetune_operator import kube
from finetune_operator.api import TERMINAL_PHASES
from finetune_operator.children import TRAINER_CONTAINER
from finetune_operator.naming import JOB_LABEL

from . import CliError
from .progress import draw, progress_from_log, progress_line


async def _namespace(namespace: str | None) -> str:
    return namespace or (await kube.client()).namespace


async def _get_job(name: str, namespace: str | None) -> dict:
    ns = await _namespace(namespace)
    job = await kube.get("FineTuneJob", ns, name)
    if job is None:
        raise CliError(f'finetunejob "{name}" not found in namespace "{ns}"')
    return job


def status_lines(job: dict, progress: bool = True) -> list[str]:
    status = job.get("status", {})
    lines = [f"{job['metadata']['name']}: {status.get('phase', 'Pending')}"]
    if progress and status.get("progress"):
        lines.append("  " + progress_line(status["progress"]))
    for cond in status.get("conditions", []):
        if cond["status"] == "True":
            message = cond.get("message") or ""
            lines.append(f"  {cond['type']}: {cond.get('reason', '')}" + (f": {message}" if message else ""))
    if status.get("model"):
        lines.append(f"  model: {status['model']}")
    return lines


async def cmd_list(args: argparse.Namespace) -> int:
    ns = await _namespace(args.namespace)
    version, plural = kube.RESOURCES["FineTuneJob"]
    # Not kube.list_, which reads a 404 as "none": a missing CRD is an error here.
    async with (await kube.client()).call_api("GET", version=version, namespace=ns, url=plural) as resp:
        items = resp.json()["items"]
    print(f"{'NAME':30} {'PHASE':12} {'PROGRESS':9} {'LOSS':8} MODEL")
    for job in items:
        status = job.get("status", {})
        progress = status.get("progress") or {}
        loss = progress.get("loss")
        print(f"{job['metadata']['name']:30} {status.get('phase', ''):12} "
              f"{str(progress.get('percent', '')) + ('%' if 'percent' in progress else ''):9} "
              f"{'' if loss is None else f'{loss:.4f}':8} {status.get('model', '')}")
    return 0


async def cmd_status(args: argparse.Namespace) -> int:
    print("\n".join(status_lines(await _get_job(args.name, args.namespace))))
    return 0


async def _trainer_pods(name: str, namespace: str) -> list[dict]:
    pods = await kube.list_("Pod", namespace, {JOB_LABEL: name})
    return sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))


async def _pod_log(namespace: str, pod: str, tail: int) -> str:
    """A trainer pod's log, through the API server (which asks the node's kubelet)."""
    version, plural = kube.RESOURCES["Pod"]
    async with (await kube.client()).call_api(
            "GET", version=version, namespace=namespace, url=f"{plural}/{pod}/log",
            params={"container": TRAINER_CONTAINER, "tailLines": str(tail)}) as resp:
        return resp.text


async def _live_progress(job: dict) -> dict[str, Any] | None:
    """Progress read from the running trainer's log, for when the status has none yet."""
    try:
        pods = await _trainer_pods(job["metadata"]["name"], job["metadata"]["namespace"])
        running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
        if not running:
            return None
        return progress_from_log(await _pod_log(job["metadata"]["namespace"], running[-1]["metadata"]["name"], 50))
    except Exception:  # noqa: BLE001 - the log is a bonus; the status is the source of truth
        return None


async def cmd_watch(args: argparse.Namespace) -> int:
    last, seen = "", None
    while True:
        job = await _get_job(args.name, args.namespace)
        status = job.get("status", {})
        phase = status.get("phase", "Pending")
        progress = status.get("progress")
        if not progress and phase == "Running":
            progress = await _live_progress(job) or seen   # between the trainer's exit and the status
        seen = progress or seen
        line = f"{phase:10} " + progress_line(progress or {})
        if line != last or sys.stdout.isatty():
            draw(line)
            last = line
        if phase in TERMINAL_PHASES:
            if sys.stdout.isatty():
                print()
            print("\n".join(status_lines(job, progress=False)[1:]))
            return 0 if phase == "Succeeded" else 1
        await asyncio.sleep(args.interval)


async def cmd_logs(args: argparse.Namespace) -> int:
    job = await _get_job(args.name, args.namespace)
    ns = job["metadata"]["namespace"]
    pods = await _trainer_pods(args.name, ns)
    if not pods:
        raise CliError(f"{args.name} has no trainer pods (yet)")
    sys.stdout.write(await _pod_log(ns, pods[-1]["metadata"]["name"], args.tail))
    return 0
