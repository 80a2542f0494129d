"""`kubectl finetune`: run FineTuneJobs locally and follow them in a cluster.

    kubectl finetune run --local JOB.yaml --volume CLAIM=DIR ...
    kubectl finetune list [-n NS] | status NAME | watch NAME | logs NAME

Errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .api import TERMINAL_PHASES, FineTuneJob
from .model import manifest_template
from .sources import UnsupportedSource
from .trainer_config import render


class PluginError(Exception):
    """A user-facing error: printed as one line."""


# --- progress bar ----------------------------------------------------------------------------


def _eta(value: Any) -> str:
    if value is None:
        return "?"
    if isinstance(value, str):
        return value
    seconds = int(value)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(progress: dict[str, Any], width: int = 30) -> str:
    step, total = progress.get("step") or 0, progress.get("totalSteps") or 0
    fraction = min(step / total, 1.0) if total else 0.0
    filled = int(fraction * width)
    parts = [f"[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:3.0f}%", f"step {step}/{total or '?'}"]
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if progress.get("tokensPerSecond") is not None:
        parts.append(f"{progress['tokensPerSecond']:,.0f} tok/s")
    parts.append(f"eta {_eta(progress.get('eta'))}")
    return "  ".join(parts)


def _draw(line: str) -> None:
    if sys.stdout.isatty():
        sys.stdout.write("\r\033[K" + line)
    else:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


# --- run --local -----------------------------------------------------------------------------


def load_job(path: str) -> FineTuneJob:
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    except OSError as exc:
        raise PluginError(f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise PluginError(f"{path}: not valid YAML: {exc}") from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "FineTuneJob"]
    if len(jobs) != 1:
        raise PluginError(f"{path}: expected exactly one FineTuneJob, found {len(jobs)}")
    raw = jobs[0]
    raw.setdefault("metadata", {}).setdefault("namespace", "local")
    raw["metadata"].setdefault("uid", "local")
    try:
        return FineTuneJob.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise PluginError(f"{path}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None


def parse_volumes(pairs: list[str]) -> dict[str, str]:
    volumes = {}
    for pair in pairs:
        claim, sep, directory = pair.partition("=")
        if not sep or not claim or not directory:
            raise PluginError(f"--volume {pair!r}: expected CLAIM=DIR")
        volumes[claim] = str(Path(directory).expanduser().resolve())
    return volumes


def run_local(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    claim_dirs = parse_volumes(args.volume)
    workdir = Path(tempfile.mkdtemp(prefix=f"finetune-{job.metadata.name}-"))
    progress_file = workdir / "progress.jsonl"
    try:
        config = render(job, manifest_template(job), claim_dirs=claim_dirs,
                        reporting={"progressFile": str(progress_file), "metricsPort": 0})
    except (UnsupportedSource, ValidationError) as exc:
        raise PluginError(str(exc).splitlines()[0]) from None
    output_dir = Path(config["output"]["dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    log_file = workdir / "trainer.log"
    print(f"training {job.metadata.name}: {job.spec.method.type} on {job.spec.base_model.source} "
          f"(log: {log_file})", flush=True)

    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "finetune_trainer.cli", "--config", str(config_file)],
                                stdout=log, stderr=subprocess.STDOUT)
        seen = 0
        while True:
            done = proc.poll() is not None
            if progress_file.exists():
                lines = progress_file.read_text().splitlines()
                for line in lines[seen:]:
                    try:
                        _draw(progress_line(json.loads(line)))
                    except (json.JSONDecodeError, TypeError):
                        pass
                seen = len(lines)
            if done:
                break
            time.sleep(0.5)
    if sys.stdout.isatty():
        print()
    if proc.returncode != 0:
        tail = [l for l in log_file.read_text().splitlines() if l.strip()]
        reason = tail[-1].removeprefix("finetune-trainer: error: ") if tail else f"exit code {proc.returncode}"
        raise PluginError(f"trainer failed (exit {proc.returncode}): {reason}")

    result_path = output_dir / "result.json"
    if not result_path.exists():
        raise PluginError(f"trainer exited 0 but wrote no {result_path}")
    result = json.loads(result_path.read_text())
    metrics = result["metrics"]
    weights = "adapter_model.safetensors" if "adapter_model.safetensors" in result["files"] else "model.safetensors"
    print(f"done: {metrics['steps']} steps, train loss {metrics['trainLoss']:.4f}, eval loss "
          f"{metrics.get('evalLoss', float('nan')):.4f} (initial {metrics.get('initialEvalLoss', float('nan')):.4f})")
    print(f"output: {output_dir}")
    if weights in result["files"]:
        print(f"{weights}: sha256 {result['files'][weights]['sha256']}")
    if (output_dir / "model.yaml").exists():
        print(f"model manifest: {output_dir / 'model.yaml'}")
    return 0


# --- cluster commands ------------------------------------------------------------------------


async def _api(namespace: str | None):
    import kr8s.asyncio

    api = await kr8s.asyncio.api()
    return api, namespace or api.namespace


async def _get_job(name: str, namespace: str | None) -> dict:
    from . import kube

    _, ns = await _api(namespace)
    job = await kube.get("FineTuneJob", ns, name)
    if job is None:
        raise PluginError(f'finetunejob "{name}" not found in namespace "{ns}"')
    return job


def _status_lines(job: dict, progress: bool = True) -> list[str]:
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
    api, ns = await _api(args.namespace)
    async with api.call_api("GET", version="finetune.ai/v1alpha1", namespace=ns, url="finetunejobs") as resp:
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
    print("\n".join(_status_lines(await _get_job(args.name, args.namespace))))
    return 0


PROGRESS_PREFIX = "FINETUNE_PROGRESS "   # the trainer's progress records on stdout (finetune_trainer.protocol)


def progress_from_log(text: str) -> dict[str, Any] | None:
    """The latest `progress` record in a trainer log, or None."""
    for line in reversed(text.splitlines()):
        _, sep, payload = line.partition(PROGRESS_PREFIX)
        if not sep:
            continue
        try:
            record = json.loads(payload)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("event") == "progress":
            return record
    return None


async def _trainer_pods(name: str, namespace: str) -> list[dict]:
    from . import kube

    pods = await kube.list_("Pod", namespace, {"finetune.ai/job": name})
    return sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))


async def _pod_log(namespace: str, pod: str, tail: int) -> str:
    """A trainer pod's log, through the API server (which asks the node's kubelet)."""
    api, _ = await _api(namespace)
    async with api.call_api("GET", version="v1", namespace=namespace, url=f"pods/{pod}/log",
                            params={"container": "trainer", "tailLines": str(tail)}) as resp:
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
            _draw(line)
            last = line
        if phase in TERMINAL_PHASES:
            if sys.stdout.isatty():
                print()
            print("\n".join(_status_lines(job, progress=False)[1:]))
            return 0 if phase == "Succeeded" else 1
        await asyncio.sleep(args.interval)


async def cmd_logs(args: argparse.Namespace) -> int:
    job = await _get_job(args.name, args.namespace)
    ns = job["metadata"]["namespace"]
    pods = await _trainer_pods(args.name, ns)
    if not pods:
        raise PluginError(f"{args.name} has no trainer pods (yet)")
    sys.stdout.write(await _pod_log(ns, pods[-1]["metadata"]["name"], args.tail))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubectl finetune", description="Run and follow FineTuneJobs.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a FineTuneJob manifest")
    run.add_argument("job", help="FineTuneJob YAML file")
    run.add_argument("--local", action="store_true", required=True, help="run here, with no cluster")
    run.add_argument("--volume", action="append", default=[], metavar="CLAIM=DIR",
                     help="map pvc://CLAIM/... to the local directory DIR (repeatable)")
    for name, helptext in [("list", "list FineTuneJobs"), ("status", "show a job's status"),
                           ("watch", "follow a job's progress until it ends"), ("logs", "print the trainer's log")]:
        cmd = sub.add_parser(name, help=helptext)
        cmd.add_argument("-n", "--namespace", default=None)
        if name != "list":
            cmd.add_argument("name")
        if name == "watch":
            cmd.add_argument("--interval", type=float, default=2.0)
        if name == "logs":
            cmd.add_argument("--tail", type=int, default=200)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            code = run_local(args)
        else:
            handler = {"list": cmd_list, "status": cmd_status, "watch": cmd_watch, "logs": cmd_logs}[args.command]
            code = asyncio.run(handler(args))
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # a cluster or network problem: still one line
        print(f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
