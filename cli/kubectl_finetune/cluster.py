"""`kubectl finetune list | status | watch | logs | suspend | resume | delete`: FineTuneJobs in a
cluster, through the API server (kubectl's kubeconfig and context unless --kubeconfig and
--context say otherwise), with the operator's own Kubernetes helpers."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from finetune_operator import kube
from finetune_operator.api import TERMINAL_PHASES
from finetune_operator.children import TRAINER_CONTAINER
from finetune_operator.naming import COMPLETION_INDEX, JOB_LABEL

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
    shape = status.get("progress") or {}
    if "globalBatchSize" in shape and "epochs" in shape:
        # What the trainer chose (spec.training auto) or was given.
        lines.append(f"  plan: {shape['epochs']} epoch(s) of batch {shape['globalBatchSize']}")
    for cond in status.get("conditions", []):
        if cond["status"] == "True":
            message = cond.get("message") or ""
            lines.append(f"  {cond['type']}: {cond.get('reason', '')}" + (f": {message}" if message else ""))
    if status.get("model"):
        lines.append(f"  model: {status['model']}")
    return lines


async def cmd_list(args: argparse.Namespace) -> int:
    ns = None if args.all_namespaces else await _namespace(args.namespace)
    version, plural = kube.RESOURCES["FineTuneJob"]
    # Not kube.list_, which reads a 404 as "none": a missing CRD is an error here.
    async with (await kube.client()).call_api("GET", version=version, namespace=ns, url=plural) as resp:
        items = resp.json()["items"]
    where = f"{'NAMESPACE':20} " if ns is None else ""
    print(f"{where}{'NAME':30} {'PHASE':12} {'PROGRESS':9} {'LOSS':8} MODEL")
    for job in items:
        status = job.get("status", {})
        progress = status.get("progress") or {}
        loss = progress.get("loss")
        where = f"{job['metadata']['namespace']:20} " if ns is None else ""
        print(f"{where}{job['metadata']['name']:30} {status.get('phase', ''):12} "
              f"{str(progress.get('percent', '')) + ('%' if 'percent' in progress else ''):9} "
              f"{'' if loss is None else f'{loss:.4f}':8} {status.get('model', '')}")
    return 0


async def cmd_status(args: argparse.Namespace) -> int:
    print("\n".join(status_lines(await _get_job(args.name, args.namespace))))
    return 0


async def _trainer_pods(name: str, namespace: str) -> list[dict]:
    pods = await kube.list_("Pod", namespace, {JOB_LABEL: name})
    return sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))


def _log_params(tail: int) -> dict[str, str]:
    params = {"container": TRAINER_CONTAINER}
    if tail >= 0:
        params["tailLines"] = str(tail)
    return params


async def _pod_log(namespace: str, pod: str, tail: int) -> str:
    """A trainer pod's log, through the API server (which asks the node's kubelet)."""
    version, plural = kube.RESOURCES["Pod"]
    async with (await kube.client()).call_api(
            "GET", version=version, namespace=namespace, url=f"{plural}/{pod}/log", params=_log_params(tail)) as resp:
        return resp.text


async def _follow_log(namespace: str, pod: str, tail: int) -> None:
    """Stream a trainer pod's log until its container ends."""
    version, plural = kube.RESOURCES["Pod"]
    async with (await kube.client()).call_api(
            "GET", version=version, namespace=namespace, url=f"{plural}/{pod}/log", stream=True,
            params={**_log_params(tail), "follow": "true"}) as resp:
        async for chunk in resp.aiter_text():
            sys.stdout.write(chunk)
            sys.stdout.flush()


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


def pick_pod(pods: list[dict], index: int, previous: bool) -> dict | None:
    """The newest pod of this node index (oldest first in `pods`), or the one before it: each
    attempt of a job (a retry, a resume, a restarted multi-node attempt) is a new pod."""
    ranked = [p for p in pods if (p["metadata"].get("annotations") or {}).get(COMPLETION_INDEX, "0") == str(index)]
    wanted = 2 if previous else 1
    return ranked[-wanted] if len(ranked) >= wanted else None


async def cmd_logs(args: argparse.Namespace) -> int:
    job = await _get_job(args.name, args.namespace)
    ns = job["metadata"]["namespace"]
    pods = await _trainer_pods(args.name, ns)
    if not pods:
        raise CliError(f"{args.name} has no trainer pods (yet)")
    pod = pick_pod(pods, args.index, args.previous)
    if pod is None:
        nodes = (job.get("spec", {}).get("distributed") or {}).get("nodes", 1)
        if args.index >= nodes:
            raise CliError(f"{args.name} runs on {nodes} node(s): --index is 0 to {nodes - 1}")
        raise CliError(f"{args.name} has no {'previous ' if args.previous else ''}trainer pod with index {args.index}")
    if args.follow:
        await _follow_log(ns, pod["metadata"]["name"], args.tail)
    else:
        sys.stdout.write(await _pod_log(ns, pod["metadata"]["name"], args.tail))
    return 0


async def _set_suspend(args: argparse.Namespace, suspend: bool) -> int:
    job = await _get_job(args.name, args.namespace)
    await kube.patch("FineTuneJob", job["metadata"]["namespace"], args.name, {"spec": {"suspend": suspend}})
    print(f"{args.name}: {'suspending (the trainer checkpoints, then its nodes are released)' if suspend else 'resuming'}")
    return 0


async def cmd_suspend(args: argparse.Namespace) -> int:
    return await _set_suspend(args, True)


async def cmd_resume(args: argparse.Namespace) -> int:
    return await _set_suspend(args, False)


async def cmd_delete(args: argparse.Namespace) -> int:
    job = await _get_job(args.name, args.namespace)
    await kube.delete("FineTuneJob", job["metadata"]["namespace"], args.name)
    print(f"{args.name}: deleted")
    return 0


COMMANDS = {"list": cmd_list, "status": cmd_status, "watch": cmd_watch, "logs": cmd_logs,
            "suspend": cmd_suspend, "resume": cmd_resume, "delete": cmd_delete}


def no_kubeconfig_hint(kubeconfig: str | None, environ: dict[str, str] | None = None, home: Path | None = None) -> str | None:
    """What to do when there is no kubeconfig to read, or None if there is one."""
    environ = os.environ if environ is None else environ
    home = Path.home() if home is None else home
    if kubeconfig or environ.get("KUBECONFIG") or (home / ".kube" / "config").exists() \
            or environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    return ("no kubeconfig found: pass --kubeconfig FILE, set KUBECONFIG, or create ~/.kube/config "
            "(for the local cluster: KUBECONFIG=.cluster/kubeconfig after `make cluster`)")


async def run(args: argparse.Namespace) -> int:
    hint = no_kubeconfig_hint(args.kubeconfig)
    if hint:
        raise CliError(hint)
    if args.kubeconfig and not Path(args.kubeconfig).exists():
        raise CliError(f"--kubeconfig {args.kubeconfig}: no such file")
    await kube.connect(args.kubeconfig, args.context)
    return await COMMANDS[args.command](args)
