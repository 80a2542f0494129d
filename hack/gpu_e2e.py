"""A FineTuneJob through the operator on a machine's own accelerator, recorded.

Run by hack/gpu-e2e.sh on the device machine (an H200 and no container runtime), after it has
started the local control plane with no nodes. This program adds the rest of a cluster as a user
has it: one process node (hack/process_node) that advertises the machine's GPUs as
`nvidia.com/gpu`, the operator from source, and data on a volume; then it applies FineTuneJobs
with `kubectl apply`, follows them through a watch (every status the operator wrote, so every
progress snapshot), and writes one record per job:

- `train`: a job of the bench's case (its model, method, micro-batch, sequence length and data),
  followed from apply to a Ready Model;
- `suspend-resume`: a shorter job suspended once a checkpoint exists, then resumed; the resumed
  trainer's first step must follow the step it stopped at, not restart from zero.

The same program runs here on CPU with a tiny preset (`--accelerator none`), which is how it is
tested before it costs device time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from common import sequence_lengths, synthetic_texts  # noqa: E402  (the bench's own data)
from finetune_trainer.protocol import PROGRESS_PREFIX  # noqa: E402

NAMESPACE = "default"
NODE_LABEL = "gpu-e2e.e2e.local/node"  # the process nodes this program starts (finetune.ai/* is the operator's)
TERMINAL = ("Succeeded", "Failed")
WARMUP_STEPS = 3  # the bench skips as many before it measures


def log(msg: str) -> None:
    print(f"[gpu-e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Cluster:
    def __init__(self, kubeconfig: str, kubectl: str) -> None:
        self.kubeconfig, self.kubectl_bin = kubeconfig, kubectl

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        out = subprocess.run([self.kubectl_bin, "--kubeconfig", self.kubeconfig, *args], input=input,
                             capture_output=True, text=True)
        if check and out.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def apply(self, obj: dict) -> None:
        self.kubectl("apply", "-f", "-", input=json.dumps(obj))

    def get(self, kind: str, name: str) -> dict | None:
        out = self.kubectl("-n", NAMESPACE, "get", kind, name, "-o", "json", "--ignore-not-found")
        return json.loads(out) if out.strip() else None


class Watch:
    """`kubectl get -w -o json` of one FineTuneJob: every version the API server sent, in order."""

    def __init__(self, cluster: Cluster, name: str, path: Path) -> None:
        self.path = path
        self.file = open(path, "w")
        self.proc = subprocess.Popen(
            [cluster.kubectl_bin, "--kubeconfig", cluster.kubeconfig, "-n", NAMESPACE, "get", "finetunejob", name,
             "-w", "-o", "json"], stdout=self.file, stderr=subprocess.DEVNULL, start_new_session=True)

    def objects(self) -> list[dict]:
        self.file.flush()
        text, decoder, out, i = self.path.read_text(), json.JSONDecoder(), [], 0
        while True:
            while i < len(text) and text[i].isspace():
                i += 1
            if i >= len(text):
                return out
            try:
                obj, i = decoder.raw_decode(text, i)
            except json.JSONDecodeError:  # a document still being written
                return out
            out.append(obj)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait()
        self.file.close()


def start(cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_until(what: str, timeout: float, fn, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def write_data(path: Path, rows: int, seq_len: int) -> None:
    with open(path, "w") as f:
        for text in synthetic_texts(sequence_lengths("fixed", rows, seq_len)):
            f.write(json.dumps({"text": text}) + "\n")


def bind_claim(cluster: Cluster, claim: str, path: Path) -> None:
    """A claim bound to a hostPath volume at PATH, which the process node serves (--volume)."""
    cluster.apply({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"e2e-{claim}"},
                   "spec": {"capacity": {"storage": "100Gi"}, "accessModes": ["ReadWriteOnce"],
                            "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                            "hostPath": {"path": str(path)}, "claimRef": {"namespace": NAMESPACE, "name": claim}}})
    cluster.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim, "namespace": NAMESPACE},
                   "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": f"e2e-{claim}",
                            "resources": {"requests": {"storage": "100Gi"}}}})
    cluster.kubectl("-n", NAMESPACE, "wait", "--for=jsonpath={.status.phase}=Bound", f"pvc/{claim}", "--timeout=60s")


def job_manifest(name: str, a: argparse.Namespace, *, steps: int, every: int) -> dict:
    resources: dict = {"accelerator": a.accelerator, "cpu": a.cpu, "memory": a.memory}
    if a.accelerator != "none":
        resources["acceleratorsPerNode"] = a.gpus
    per_step = a.micro_batch * a.gpus * a.nodes if a.accelerator != "none" else a.micro_batch * a.nodes
    return {
        "apiVersion": "finetune.ai/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "baseModel": {"source": f"preset://{a.preset}"},
            "dataset": {"source": "pvc://data/train.jsonl", "format": "text", "validationSplit": a.validation_split},
            "method": {"type": a.method, "lora": {"r": 16, "alpha": 32, "targetModules": ["all-linear"]}},
            # The bench's case: one micro-batch of microBatchSize rows per GPU per optimizer step.
            "training": {"maxSteps": steps, "microBatchSize": a.micro_batch, "globalBatchSize": per_step,
                         "maxSeqLength": a.seq_len, "packing": True},
            "distributed": {"zeroStage": 2, "nodes": a.nodes},
            "checkpointing": {"everySteps": every},
            "resources": resources,
            "nodePool": {"provisioner": "existing", "nodeSelector": {NODE_LABEL: "true"}},
            "output": {"destination": f"pvc://models/{name}"},
        },
    }


def progress_snapshots(objects: list[dict]) -> list[dict]:
    """Each distinct status.progress the operator wrote, with the phase beside it."""
    out, last = [], None
    for obj in objects:
        progress = (obj.get("status") or {}).get("progress")
        if progress and progress != last:
            out.append({"phase": obj["status"].get("phase"), "resourceVersion": obj["metadata"]["resourceVersion"],
                        **progress})
            last = progress
    return out


def phases(objects: list[dict]) -> list[str]:
    out: list[str] = []
    for obj in objects:
        phase = (obj.get("status") or {}).get("phase")
        if phase and (not out or out[-1] != phase):
            out.append(phase)
    return out


def follow(cluster: Cluster, name: str, watch: Watch, timeout: float, until=None) -> dict:
    def done():
        if watch.proc.poll() is not None:
            raise RuntimeError(f"the watch of {name} ended (exit {watch.proc.returncode})")
        objects = watch.objects()
        if not objects:
            return None
        last = objects[-1]
        if until is not None:
            return last if until(last) else None
        phase = (last.get("status") or {}).get("phase")
        if phase == "Failed":
            raise RuntimeError(f"{name} failed: {json.dumps(last['status'])[:2000]}")
        return last if phase in TERMINAL else None
    return wait_until(f"{name}", timeout, done, interval=0.5)


def model_ready(cluster: Cluster, name: str) -> dict | None:
    model = cluster.get("model", name)
    return model if model and (model.get("status") or {}).get("phase") == "Ready" else None


def trainer_logs(cluster: Cluster, name: str) -> str:
    return cluster.kubectl("-n", NAMESPACE, "logs", "-l", f"finetune.ai/job={name}", "--tail=400", "--prefix",
                           check=False)


def run_train(cluster: Cluster, a: argparse.Namespace, out: Path) -> dict:
    name = "e2e-train"
    manifest = job_manifest(name, a, steps=a.steps, every=10**6)
    applied = time.monotonic()
    applied_at = now()
    cluster.apply(manifest)
    watch = Watch(cluster, name, out / f"{name}.watch.json")  # lists the object first, then every change
    log(f"applied {name}; following it")
    try:
        final = follow(cluster, name, watch, a.timeout)
        model = wait_until(f"Model {name} Ready", 120, lambda: model_ready(cluster, name))
        ready_s = time.monotonic() - applied
    finally:
        objects = watch.objects()
        watch.stop()
    snapshots = progress_snapshots(objects)
    measured = [s["tokensPerSecond"] for s in snapshots
                if s.get("tokensPerSecond") and (s.get("step") or 0) > WARMUP_STEPS and (s.get("step") or 0) < a.steps]
    log(f"{name}: {final['status']['phase']} in {ready_s:.0f} s to a Ready Model; "
        f"{len(snapshots)} progress snapshots; median {statistics.median(measured) if measured else 0:.0f} tok/s")
    return {
        "job": manifest,
        "appliedAt": applied_at,
        "phases": phases(objects),
        "progressSnapshots": snapshots,
        "statusWrites": len(objects),
        "finalStatus": final["status"],
        "model": {k: model[k] for k in ("metadata", "spec", "status")},
        "applyToReadySeconds": round(ready_s, 1),
        "progressTokensPerSecond": {"median": statistics.median(measured) if measured else None,
                                    "samples": len(measured), "excludes": f"steps <= {WARMUP_STEPS} and the last"},
        "trainerLog": trainer_logs(cluster, name)[-20000:],
    }


def run_suspend_resume(cluster: Cluster, a: argparse.Namespace, out: Path) -> dict:
    name = "e2e-suspend"
    every, steps = a.resume_every, a.resume_steps
    manifest = job_manifest(name, a, steps=steps, every=every)
    cluster.apply(manifest)
    watch = Watch(cluster, name, out / f"{name}.watch.json")
    log(f"applied {name}; suspending it after step {every + 2}")
    try:
        def past_checkpoint(obj):
            return ((obj.get("status") or {}).get("progress") or {}).get("step", 0) >= every + 2
        running = follow(cluster, name, watch, a.timeout, until=past_checkpoint)
        step_before = running["status"]["progress"]["step"]
        cluster.kubectl("-n", NAMESPACE, "patch", "finetunejob", name, "--type=merge", "-p", '{"spec":{"suspend":true}}')
        follow(cluster, name, watch, 300, until=lambda o: (o.get("status") or {}).get("phase") == "Suspended")
        wait_until("the trainer pods gone", 300, lambda: not json.loads(cluster.kubectl(
            "-n", NAMESPACE, "get", "pods", "-l", f"finetune.ai/job={name}", "-o", "json"))["items"])
        suspended = watch.objects()[-1]
        log(f"{name}: Suspended at step {suspended['status'].get('progress', {}).get('step')}; resuming")
        cluster.kubectl("-n", NAMESPACE, "patch", "finetunejob", name, "--type=merge", "-p", '{"spec":{"suspend":false}}')
        final = follow(cluster, name, watch, a.timeout)
        wait_until(f"Model {name} Ready", 120, lambda: model_ready(cluster, name))
    finally:
        objects = watch.objects()
        watch.stop()
    snapshots = progress_snapshots(objects)
    suspended_at = max(i for i, o in enumerate(objects) if (o.get("status") or {}).get("phase") == "Suspended")
    before = progress_snapshots(objects[:suspended_at + 1])
    after = progress_snapshots(objects[suspended_at + 1:])
    last_before = before[-1]["step"]
    first_after = next((s["step"] for s in after if s.get("step") is not None and s["step"] != last_before), None)
    logs = trainer_logs(cluster, name)
    resumed_lines = [line for line in logs.splitlines() if "resum" in line.lower() or "checkpoint" in line.lower()]
    # The trainer's own word: its "started" event says the step it resumed at.
    started = [json.loads(line.split(PROGRESS_PREFIX, 1)[1]) for line in logs.splitlines() if PROGRESS_PREFIX in line]
    resumed_at = next((e["step"] for e in started if e.get("event") == "started" and e.get("resumed")), None)
    record = {
        "job": manifest,
        "phases": phases(objects),
        "progressSnapshots": snapshots,
        "stepWhenSuspendAsked": step_before,
        "lastStepBeforeSuspend": last_before,
        "firstStepAfterResume": first_after,
        "checkpointEverySteps": every,
        "trainerResumedAtStep": resumed_at,
        "continued": first_after is not None and first_after > every and resumed_at is not None and resumed_at >= every,
        "finalStatus": final["status"],
        "trainerLogLines": resumed_lines[-40:],
    }
    log(f"{name}: last step before suspend {last_before}, first after resume {first_after}; {final['status']['phase']}")
    if not record["continued"]:
        raise RuntimeError(f"the resumed job did not continue from its checkpoint: {record['phases']}, "
                           f"before {last_before}, after {first_after}")
    return record


def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return "; ".join(line.strip() for line in out.stdout.strip().splitlines())
    except FileNotFoundError:
        pass
    return f"CPU only ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--kubectl", default="kubectl")
    p.add_argument("--work", type=Path, required=True, help="volumes, logs and state of this run")
    p.add_argument("--out", type=Path, required=True, help="where the record goes")
    p.add_argument("--run-id", default=time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    p.add_argument("--preset", default="llama-8b")
    p.add_argument("--method", default="lora")
    p.add_argument("--accelerator", default="nvidia.com/gpu")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--cpu", default="8")
    p.add_argument("--memory", default="100Gi")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--validation-split", type=float, default=0.02)
    p.add_argument("--resume-every", type=int, default=10)
    p.add_argument("--resume-steps", type=int, default=30)
    p.add_argument("--timeout", type=float, default=420)
    p.add_argument("--nodes", type=int, default=1, help="process nodes, each with --gpus of the machine's GPUs")
    p.add_argument("--cluster-dns", default="127.0.0.10", help="for several nodes: the cluster DNS (hack/cluster.sh)")
    p.add_argument("--operator-ports", default="18180,18181,18182", help="metrics,health,progress")
    p.add_argument("--bench-summary", type=Path, help="the bench's summary.json of this call, for the comparison")
    p.add_argument("--skip", default="", help="comma-separated: train, suspend-resume")
    a = p.parse_args()

    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    data, models = a.work / "data", a.work / "models"
    data.mkdir(exist_ok=True)
    models.mkdir(exist_ok=True)
    rows = (max(a.steps, a.resume_steps) + 10) * a.micro_batch * a.gpus * a.nodes
    write_data(data / "train.jsonl", int(rows / (1 - a.validation_split)) + 1, a.seq_len)
    cluster = Cluster(a.kubeconfig, a.kubectl)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "hack"), os.environ.get("PYTHONPATH")]))}
    env.pop("KUBECONFIG", None)
    node_cmds = {}
    for i in range(a.nodes):
        name = f"gpu-{i}"
        # Several nodes on one host: each its own loopback IP (its pods' IP) and its own GPUs.
        cmd = [sys.executable, "-m", "process_node", "--kubeconfig", a.kubeconfig, "--node-name", name,
               "--node-ip", f"127.0.0.{2 + i}" if a.nodes > 1 else "127.0.0.1", "--label", f"{NODE_LABEL}=true",
               "--state-dir", str(a.work / name), "--log-file", str(a.work / f"{name}.log"),
               "--volume", f"data={data}", "--volume", f"models={models}",
               "--cpu", str(max(1, (os.cpu_count() or 2) // a.nodes)), "--memory", "120Gi"]
        if a.nodes > 1:
            cmd += ["--cluster-dns", a.cluster_dns]
        if a.accelerator != "none":
            # Its share of the machine's GPUs, handed to the trainer pod as a device plugin would.
            share = range(i * a.gpus, (i + 1) * a.gpus)
            cmd += ["--device", f"{a.accelerator}={','.join(str(g) for g in share)}"]
        node_cmds[name] = cmd
    metrics_port, health_port, progress_port = a.operator_ports.split(",")
    operator_env = {**os.environ, "KUBECONFIG": a.kubeconfig, "FINETUNE_METRICS_PORT": metrics_port,
                    "FINETUNE_HEALTH_PORT": health_port, "FINETUNE_PROGRESS_PORT": progress_port,
                    "FINETUNE_PROGRESS_URL": f"http://127.0.0.1:{progress_port}", "FINETUNE_NAMESPACES": NAMESPACE,
                    "FINETUNE_PROGRESS_INTERVAL_SECONDS": "2"}
    # The CRDs as a user installs them (the chart holds the same files).
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/finetunejobs.finetune.ai",
                    "crd/models.finetune.ai")
    for claim, path in (("data", data), ("models", models)):
        bind_claim(cluster, claim, path)
    nodes = [start(cmd, a.work / f"{name}.stdout", env) for name, cmd in node_cmds.items()]
    operator = start([sys.executable, "-m", "finetune_operator"], a.work / "operator.log", operator_env)
    record: dict = {"runId": a.run_id, "device": device_name(), "startedAt": now(), "kind": "operator-e2e",
                    "host": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    try:
        for name in node_cmds:
            wait_until(f"node {name} Ready", 60, lambda: any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in ((cluster.get("node", name) or {}).get("status") or {}).get("conditions", [])))
        wait_until("the operator healthy", 90, lambda: subprocess.run(
            ["curl", "-sf", f"http://127.0.0.1:{health_port}/healthz"], capture_output=True).returncode == 0)
        log(f"nodes {', '.join(node_cmds)} Ready, operator healthy; device: {record['device']}")
        skip = set(filter(None, a.skip.split(",")))
        if "train" not in skip:
            record["train"] = run_train(cluster, a, a.out)
            if a.bench_summary and a.bench_summary.exists():
                record["train"]["bench"] = compare_with_bench(record["train"], a)
        if "suspend-resume" not in skip:
            record["suspendResume"] = run_suspend_resume(cluster, a, a.out)
        record["ok"] = True
    except Exception as err:  # the record says what failed, with the logs beside it
        record["ok"] = False
        record["error"] = f"{type(err).__name__}: {err}"
        log(record["error"])
    finally:
        record["finishedAt"] = now()
        stop(operator)
        for node in nodes:
            stop(node)
        (a.out / f"{a.run_id}.json").write_text(json.dumps(record, indent=1) + "\n")
        log(f"record: {a.out / (a.run_id + '.json')}")
    return 0 if record["ok"] else 1


def compare_with_bench(train: dict, a: argparse.Namespace) -> dict:
    rows = json.loads(a.bench_summary.read_text())
    mine = [r for r in rows if r.get("model") == a.preset and r.get("method") == a.method and r.get("data") == "fixed"
            and r.get("system") == "ours" and r.get("gpus") == a.gpus * a.nodes and r.get("seqLen") == a.seq_len
            and r.get("variant") == "default"]
    if not mine:
        return {"error": "no bench row for this case in " + str(a.bench_summary)}
    row = mine[-1]
    bench = row["tokensPerSecPerGpu"] * a.gpus * a.nodes
    seen = train["progressTokensPerSecond"]["median"]
    return {"case": row["case"], "runId": row.get("runId"), "benchTokensPerSecond": bench,
            "progressTokensPerSecond": seen, "ratio": round(seen / bench, 4) if seen else None,
            "withinTenPercent": bool(seen) and abs(seen / bench - 1) <= 0.10}


if __name__ == "__main__":
    sys.exit(main())
