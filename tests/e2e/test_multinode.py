"""A FineTuneJob with `distributed.nodes: 2`, on CPU, across two real nodes: two process nodes
(hack/process_node) on their own loopback IPs, 127.0.0.2 and 127.0.0.3, driven by the real
operator, with the cluster's CoreDNS as their cluster DNS.

What it shows: the indexed Job's two pods land on the two nodes, find rank 0 through the
headless Service's name (`<job>-trainer-0.<job>-trainer`, completed by the pods' search path and
answered by CoreDNS), rendezvous there (torchrun, static, on rank 0's port 29500) and train one
model with gloo, whose per-step losses equal a one-node run of the same global batch; and when
one node's trainer dies mid-run, the operator restarts the whole attempt, which resumes from the
latest checkpoint.

Both nodes mount the same host directories for the claims, as a ReadWriteMany volume would be
shared (every rank writes its part of a checkpoint)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from kubetools import CLUSTER_DNS, REPO, Kubectl, ProcessNode, dns_a, wait_for
from conftest import volume_dirs

pytestmark = pytest.mark.integration
NODE_IPS = ("127.0.0.2", "127.0.0.3")
LABEL = "multinode-test.e2e.local/namespace"  # not finetune.ai/*: reserved for the operator
PROGRESS = re.compile(r"FINETUNE_PROGRESS (\{.*\})")
COREDNS_LOG = REPO / ".cluster" / "logs" / "coredns.log"


@pytest.fixture
def nodes(kubeconfig: str, namespace: str, claims, tmp_path: Path, request):
    """Two process nodes, one CPU each (so the scheduler puts one trainer pod on each), tainted and
    labelled for this test only."""
    try:
        assert dns_a("kubernetes.default.svc.cluster.local")[1], "no answer"
    except (OSError, AssertionError) as exc:
        pytest.fail(f"no cluster DNS at {CLUSTER_DNS} ({exc}): `hack/cluster.sh up` starts CoreDNS")
    data, models = volume_dirs(kubeconfig, namespace)
    shutil.copy(REPO / "examples" / "data" / "quickstart.jsonl", data)
    started = []
    for i, ip in enumerate(NODE_IPS):
        node = ProcessNode(
            kubeconfig, tmp_path / f"node{i}", f"mn{i}",
            ["--node-ip", ip, "--cluster-dns", CLUSTER_DNS, "--cpu", "1", "--memory", "8Gi",
             "--volume", f"data={data}", "--volume", f"models={models}", "--label", f"{LABEL}={namespace}",
             "--heartbeat-seconds", "2", "--shutdown-grace-seconds", "5"],
            taint_key=LABEL,
            # One thread per trainer: two of them share this machine's two cores.
            env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        node.ip = ip
        started.append(node.start())
    yield started
    for node in started:
        node.stop()
        node.delete()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for node in started:
            print(f"\n----- process node {node.name} ({node.ip}) log -----\n{node.log[-4000:]}")
            print(f"\n----- its containers -----\n{node.container_log(namespace, '')[-6000:]}")


def job(name: str, namespace: str, nodes: int, **spec) -> dict:
    manifest = {
        "apiVersion": "finetune.ai/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {
            "baseModel": {"source": "preset://tiny-llama"},
            "dataset": {"source": "pvc://data/quickstart.jsonl", "validationSplit": 0.05},
            "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["all-linear"]}},
            # One row per micro-batch and no packing: each rank's rows are exactly what one
            # process would accumulate, so the two runs' step losses agree to float reordering.
            "training": {"maxSteps": 6, "learningRate": 3.0e-3, "microBatchSize": 1, "globalBatchSize": 4,
                         "maxSeqLength": 256, "packing": False, "gradientCheckpointing": False, "seed": 7},
            "distributed": {"zeroStage": 0, "nodes": nodes},
            "resources": {"accelerator": "none", "cpu": "1", "memory": "4Gi"},
            "nodePool": {"provisioner": "existing", "nodeSelector": {LABEL: namespace},
                         "tolerations": [{"key": LABEL, "operator": "Exists", "effect": "NoSchedule"}]},
            "output": {"destination": f"pvc://models/{name}"},
            "checkpointing": {"everySteps": 1000, "keep": 2},
            "backoffLimit": 2,
        },
    }
    for section, fields in spec.items():
        manifest["spec"][section] = {**manifest["spec"].get(section, {}), **fields}
    return manifest


def phase(kubectl: Kubectl, name: str, *phases: str, timeout: float = 240, nodes: list | None = None) -> dict:
    try:
        return wait_for(lambda: (f := kubectl.get("ftj", name)) and f.get("status", {}).get("phase") in phases and f,
                        timeout, interval=1, what=f"{name} to reach {' or '.join(phases)}")
    except AssertionError as exc:
        # Say why, when it is the rendezvous: torchrun retries a name it cannot resolve until its timeout.
        unresolved = sorted({line.split("]", 1)[-1].strip() for node in nodes or []
                             for line in node.container_log(kubectl.namespace or "", name).splitlines()
                             if "cannot be retrieved" in line or "name resolution" in line})
        raise AssertionError(f"{exc}; rendezvous name lookups failing: {unresolved[-3:]}" if unresolved else str(exc)) from None


def trainer_pods(kubectl: Kubectl, name: str) -> list[dict]:
    return sorted(kubectl.items("pods", f"finetune.ai/job={name}"),
                  key=lambda p: int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]))


def losses(text: str) -> dict[int, float]:
    """Step -> loss from the trainer's progress records (rank 0's stdout)."""
    out = {}
    for m in PROGRESS.finditer(text):
        record = json.loads(m.group(1))
        if record.get("event") == "progress":
            out[record["step"]] = record["loss"]
    return out


def pod_log(nodes: list[ProcessNode], namespace: str, pod: dict) -> str:
    for node in nodes:
        logs = list((node.state_dir / "logs").glob(f"{namespace}_{pod['metadata']['name']}_{pod['metadata']['uid']}/*.log"))
        if logs:
            return "\n".join(p.read_text(errors="replace") for p in logs)
    return ""


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        found.add(p)
        todo += children.get(p, [])
    return found


def listeners(port: int) -> set[int]:
    """Pids with a listening TCP socket on `port` (any address)."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    return {int(p) for p in re.findall(r"pid=(\d+)", out)}


def container_pid(pod: dict) -> int:
    return int(pod["status"]["containerStatuses"][0]["containerID"].removeprefix("process://"))


def test_two_nodes_rendezvous_through_cluster_dns_and_train_like_one(kubectl, namespace, nodes, operator) -> None:
    dns_log_start = COREDNS_LOG.stat().st_size if COREDNS_LOG.exists() else 0
    kubectl.apply(job("mn2", namespace, 2))
    ftj = phase(kubectl, "mn2", "Succeeded", "Failed", nodes=nodes)
    assert ftj["status"]["phase"] == "Succeeded", json.dumps(ftj["status"], indent=1)
    pods = trainer_pods(kubectl, "mn2")
    assert {p["spec"]["nodeName"] for p in pods} == {n.name for n in nodes}, "one pod per node"
    ip_of = {n.name: n.ip for n in nodes}
    assert [p["status"]["podIP"] for p in pods] == [ip_of[p["spec"]["nodeName"]] for p in pods]
    assert [p["spec"]["hostname"] for p in pods] == ["mn2-trainer-0", "mn2-trainer-1"]
    assert "--master-addr=mn2-trainer-0.mn2-trainer" in pods[1]["spec"]["containers"][0]["command"]

    # (a) Rank 0's name resolved through CoreDNS to rank 0's pod IP: the search path completed
    # the short name torchrun was given, and the podhosts plugin answered from the pods.
    fqdn = f"mn2-trainer-0.mn2-trainer.{namespace}.svc.cluster.local."
    dns_log = COREDNS_LOG.read_text(errors="replace")[dns_log_start:]
    answered = [line for line in dns_log.splitlines() if f'"A IN {fqdn} ' in line and " NOERROR " in line]
    assert answered, f"no answered query for {fqdn} in {COREDNS_LOG}"
    rank1_log = pod_log(nodes, namespace, pods[1])
    assert "FINETUNE_PROGRESS" not in rank1_log, "only rank 0 reports"

    # (b) One model, published.
    model = kubectl.get("model", "mn2")
    assert model and model["status"]["phase"] == "Ready", model

    # (c) The same global batch on one node gives the same loss curve (gloo sums in another order).
    two = losses(pod_log(nodes, namespace, pods[0]))
    kubectl.apply(job("mn1", namespace, 1))
    one_ftj = phase(kubectl, "mn1", "Succeeded", "Failed")
    assert one_ftj["status"]["phase"] == "Succeeded", json.dumps(one_ftj["status"], indent=1)
    [single] = trainer_pods(kubectl, "mn1")
    one = losses(pod_log(nodes, namespace, single))
    assert sorted(two) == sorted(one) == list(range(1, 7)), (two, one)
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5), (step, two, one)


def test_a_dead_peer_restarts_the_attempt_which_resumes_from_the_checkpoint(kubectl, namespace, nodes, operator) -> None:
    _, models = volume_dirs(kubectl.kubeconfig, namespace)
    kubectl.apply(job("mnkill", namespace, 2, training={"maxSteps": 14}, checkpointing={"everySteps": 3, "keep": 2}))
    checkpoints = models / "mnkill" / "checkpoints"
    wait_for(lambda: list(checkpoints.glob("step-*")), 240, interval=0.5, what="the first checkpoint")
    first = trainer_pods(kubectl, "mnkill")
    assert len(first) == 2 and all(p["status"].get("phase") == "Running" for p in first), first
    # While they run, the cluster DNS gives each rank's name its pod IP (its node's).
    for p in first:
        fqdn = f"{p['spec']['hostname']}.mnkill-trainer.{namespace}.svc.cluster.local"
        assert dns_a(fqdn) == (0, [p["status"]["podIP"]]), fqdn
    assert {p["status"]["podIP"] for p in first} == set(NODE_IPS)
    # Only rank 0 serves the rendezvous port.
    rank0, rank1 = (descendants(container_pid(p)) for p in first)
    serving = listeners(29500)
    assert serving and serving <= rank0 and not serving & rank1, (serving, rank0, rank1)

    # Kill rank 1's trainer (the worker torchrun runs), as a crash would.
    workers = [pid for pid in rank1 if b"finetune_trainer" in Path(f"/proc/{pid}/cmdline").read_bytes()
               and pid != container_pid(first[1])] if rank1 else []
    assert workers, "no trainer worker under rank 1's container"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    killed_at = max(int(p.name.removeprefix("step-")) for p in checkpoints.glob("step-*"))

    ftj = phase(kubectl, "mnkill", "Succeeded", "Failed", timeout=300, nodes=nodes)
    assert ftj["status"]["phase"] == "Succeeded", json.dumps(ftj["status"], indent=1)
    final = trainer_pods(kubectl, "mnkill")
    first_uids = {p["metadata"]["uid"] for p in first}
    second = [p for p in final if p["metadata"]["uid"] not in first_uids and p["status"].get("phase") == "Succeeded"]
    assert len(second) == 2, "the whole attempt ran again, both ranks"
    log = pod_log(nodes, namespace, second[0] if second[0]["spec"]["hostname"].endswith("-0") else second[1])
    resumed = re.search(r"resumed from \S+ \(step (\d+)\)", log)
    assert resumed, f"the new attempt did not resume:\n{log[-3000:]}"
    steps = sorted(losses(log))
    assert int(resumed.group(1)) >= killed_at >= 3 and steps[0] == int(resumed.group(1)) + 1 and steps[-1] == 14, steps
