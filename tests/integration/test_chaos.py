"""Faults: the operator killed at random points of many job lifecycles, a node lost under a running
trainer, the API server restarted mid-run. The operator must keep every promise: no duplicate
children, no orphans, every job in the right final phase."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time

import pytest
from test_node_pools import KARPENTER_ENV
from test_operator import RESULT, condition, finish_pod, job_manifest, running_pod, wait_phase

from kubetools import REPO, Kubectl, OperatorProcess, wait_for

pytestmark = [pytest.mark.usefixtures("claims"), pytest.mark.slow]


class Killer(threading.Thread):
    """SIGKILLs the operator at random moments and starts it again, like a crash-looping pod."""

    def __init__(self, operator: OperatorProcess, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.operator, self.rng, self.kills = operator, rng, 0
        self.halt = threading.Event()

    def run(self) -> None:
        # 1.5 to 5 s apart: a restarted operator needs about 2 s to start and lead again, and it
        # must get some work done between kills or no lifecycle would ever finish.
        while not self.halt.wait(self.rng.uniform(1.5, 5.0)):
            self.operator.kill(signal.SIGKILL)
            self.kills += 1
            self.operator.start()


def test_random_operator_kills_over_many_lifecycles(kubectl, kubeconfig, namespace, tmp_path):
    rng = random.Random(20261127)
    cluster = Kubectl(kubeconfig)
    operator = OperatorProcess(kubeconfig, namespace, tmp_path / "operator.log", env=KARPENTER_ENV).start()
    killer = Killer(operator, rng)
    # Outcomes cover every path: success (publishes a Model), retryable failure then success,
    # user error, exit 0 without a result; some jobs get a Karpenter pool that must be released.
    plans = ["succeed", "retry-then-succeed", "bad-data", "no-result"] * 4
    jobs = {}
    try:
        killer.start()
        for i, plan in enumerate(plans):
            name = f"chaos-{i}"
            spec = {"backoffLimit": 2}
            if i % 4 == 1:
                spec |= {"nodePool": {"provisioner": "karpenter"},
                         "resources": {"accelerator": "none", "cpu": "2", "memory": "4Gi"}}
            jobs[name] = (plan, kubectl.create(job_manifest(name, **spec))["metadata"]["uid"])
            time.sleep(rng.uniform(0, 0.5))
        pending = dict(jobs)
        deadline = time.monotonic() + 600
        finished_once: set[str] = set()
        while pending and time.monotonic() < deadline:
            for name, (plan, _) in list(pending.items()):
                live = [p for p in kubectl.items("pods", f"finetune.ai/job={name}")
                        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
                ftj = kubectl.get("ftj", name)
                if ftj.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    del pending[name]
                    continue
                if not live or "kwok.finetune.ai/exit-code" in live[0]["metadata"].get("annotations", {}):
                    continue
                pod = live[0]
                if plan == "succeed" or (plan == "retry-then-succeed" and name in finished_once):
                    finish_pod(kubectl, pod, 0, json.dumps(RESULT))
                elif plan == "retry-then-succeed":
                    finish_pod(kubectl, pod, 1, "transient failure")
                    finished_once.add(name)
                elif plan == "bad-data":
                    finish_pod(kubectl, pod, 2, "dataset line 3: not valid JSON")
                else:
                    finish_pod(kubectl, pod, 0)
            time.sleep(0.5)
        while killer.kills < 50:
            time.sleep(0.5)  # keep killing until the quota is met, through idle resyncs too
    finally:
        killer.halt.set()
        killer.join()
    if operator.proc.poll() is not None:
        operator.start()
    try:
        expected = {"succeed": ("Succeeded", "Completed"), "retry-then-succeed": ("Succeeded", "Completed"),
                    "bad-data": ("Failed", "InvalidInput"), "no-result": ("Failed", "NoResult")}
        duplicates = orphans = 0
        for name, (plan, uid) in jobs.items():
            phase, reason = expected[plan]
            ftj = wait_phase(kubectl, phase, name, timeout=120)
            assert condition(ftj, phase)["reason"] == reason, (name, ftj["status"])
            jobs_of = kubectl.items("jobs", f"finetune.ai/job={name}")
            maps_of = kubectl.items("configmaps", f"finetune.ai/job={name}")
            duplicates += max(0, len(jobs_of) - 1) + max(0, len(maps_of) - 1)
            assert len(jobs_of) == 1 and len(maps_of) == 1, name
            model = kubectl.get("model", name)
            assert (model is not None) == (phase == "Succeeded"), name
            if model:
                assert model["spec"]["sourceJob"]["uid"] == uid and model["status"]["phase"] == "Ready"
        for _, (_, uid) in jobs.items():
            def pools_left(uid=uid):
                return cluster.items("nodepools.karpenter.sh", f"finetune.ai/job-uid={uid}")
            try:
                wait_for(lambda: not pools_left(), 60, what="released node pools")
            except AssertionError:
                orphans += len(pools_left())
        owners = {uid for _, uid in jobs.values()}
        for kind in ("jobs", "configmaps", "models"):
            for obj in kubectl.items(kind, "app.kubernetes.io/managed-by=finetune-operator"):
                if obj["metadata"]["ownerReferences"][0]["uid"] not in owners:
                    orphans += 1
        summary = {"kills": killer.kills, "jobs": len(jobs), "duplicates": duplicates, "orphans": orphans}
        print(f"\nchaos summary: {json.dumps(summary)}")
        (REPO / ".cluster").mkdir(exist_ok=True)
        (REPO / ".cluster" / "chaos-summary.json").write_text(json.dumps(summary))
        assert killer.kills >= 50
        assert duplicates == 0 and orphans == 0
    finally:
        operator.stop()


def test_node_lost_under_a_running_trainer(kubectl, kubeconfig, operator):
    """The node dies: its pods are garbage-collected, the Job starts a new pod elsewhere, and the
    job carries on (the trainer resumes from its checkpoint on the output volume)."""
    cluster = Kubectl(kubeconfig)
    node = {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": f"doomed-{kubectl.namespace}", "annotations": {"kwok.x-k8s.io/node": "fake"},
                         "labels": {"kubernetes.io/hostname": f"doomed-{kubectl.namespace}", "doomed": kubectl.namespace}},
            "status": {"capacity": {"cpu": "8", "memory": "32Gi", "pods": "10"},
                       "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "10"}}}
    cluster.apply(node)
    try:
        wait_for(lambda: any(c["type"] == "Ready" and c["status"] == "True"
                             for c in cluster.get("node", node["metadata"]["name"])["status"].get("conditions", [])),
                 30, what="the node to be Ready")
        kubectl.create(job_manifest(nodePool={"provisioner": "existing", "nodeSelector": {"doomed": kubectl.namespace}}))
        first = running_pod(kubectl)
        assert first["spec"]["nodeName"] == node["metadata"]["name"]
        cluster("delete", "node", node["metadata"]["name"])
        # The replacement cannot land (the selector named the lost node), so bring a node back.
        cluster.apply({**node, "metadata": {**node["metadata"], "name": f"spare-{kubectl.namespace}",
                                            "labels": {**node["metadata"]["labels"], "kubernetes.io/hostname": f"spare-{kubectl.namespace}"}}})
        second = wait_for(lambda: next((p for p in kubectl.items("pods", "finetune.ai/job=demo")
                                        if p["status"].get("phase") == "Running" and p["metadata"]["uid"] != first["metadata"]["uid"]), None),
                          120, what="a replacement trainer pod")
        assert second["spec"]["nodeName"] == f"spare-{kubectl.namespace}"
        ftj = wait_phase(kubectl, "Running")
        assert ftj["status"]["phase"] == "Running"
        finish_pod(kubectl, second, 0, json.dumps(RESULT))
        wait_phase(kubectl, "Succeeded")
    finally:
        cluster("delete", "node", f"spare-{kubectl.namespace}", node["metadata"]["name"], "--ignore-not-found", check=False)


def test_api_server_restart_mid_run(kubectl, operator):
    kubectl.create(job_manifest())
    pod = running_pod(kubectl)
    pid = int((REPO / ".cluster" / "pids" / "kube-apiserver").read_text())
    subprocess.run(["kill", "-9", str(pid)], check=True)  # a crash, not a drain
    def stopped():  # gone, or a zombie nobody reaps
        state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
        return not state or state.startswith("Z")

    wait_for(stopped, 30, what="the API server to stop")
    time.sleep(2)
    subprocess.run([str(REPO / "hack" / "cluster.sh"), "up"], check=True, capture_output=True, timeout=120)
    wait_for(lambda: kubectl("get", "--raw", "/readyz", check=False).returncode == 0, 60, what="the API server")
    finish_pod(kubectl, pod, 0, json.dumps(RESULT))
    wait_phase(kubectl, "Succeeded", timeout=90)
    assert operator.proc.poll() is None, "the operator exited instead of reconnecting"
