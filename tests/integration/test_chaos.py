"""Faults: the operator killed at random points of many job lifecycles, a node lost under a running
trainer, the API server restarted mid-run. The operator must keep every promise: no duplicate
children, no orphans, every job in the right final phase."""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import time

import pytest
from test_node_pools import KARPENTER_ENV
from test_operator import RESULT, condition, finish_pod, job_manifest, running_pod, wait_phase

from finetune_operator.crashpoints import RELEASED_NODE_POOL, created, status_written
from kubetools import REPO, CrashPoints, Kubectl, OperatorProcess, Supervisor, wait_for

pytestmark = [pytest.mark.usefixtures("claims"), pytest.mark.slow]


# Every moment of a lifecycle where a crash leaves work half done, by plan (crashpoints.py): each
# child created but the next not yet, the Model created but not yet Ready, a phase written but what
# follows it not done, a NodePool released but the finalizer still on.
CREATE = [created("Secret"), created("ConfigMap"), created("NetworkPolicy"), created("Job"), status_written("Running")]
# Each plan's own windows first: the rotation below reaches them first.
WINDOWS = {
    "succeed": [created("Model"), status_written("Succeeded")] + CREATE,
    "retry-then-succeed": [created("Model"), status_written("Succeeded")] + CREATE,
    "bad-data": [status_written("Failed")] + CREATE,
    "no-result": [status_written("Failed")] + CREATE,
    "deleted": CREATE,
}
EXPECTED = {"succeed": ("Succeeded", "Completed"), "retry-then-succeed": ("Succeeded", "Completed"),
            "bad-data": ("Failed", "InvalidInput"), "no-result": ("Failed", "NoResult")}
CHILD_KINDS = ("jobs", "configmaps", "secrets", "networkpolicies", "pods", "models")


def _windows(plan: str, pool: bool) -> list[str]:
    windows = WINDOWS[plan] + ([created("NodePool")] if pool else [])
    return windows + ([RELEASED_NODE_POOL] if plan == "deleted" and pool else [])


@pytest.mark.timeout(1200)
def test_crashes_at_every_window_over_many_lifecycles(kubectl, kubeconfig, namespace, tmp_path):
    """SIGKILLs aimed where a crash hurts (every one lands mid-work), over jobs that succeed, fail,
    retry, and are deleted while running, with and without node pools. Every job ends as its plan
    says, its Model is Ready, and nothing is left of the deleted ones: no child, no pool."""
    rng = random.Random(20261201)
    cluster = Kubectl(kubeconfig)
    crashes = CrashPoints(tmp_path / "crash-points")
    plans = ["succeed", "retry-then-succeed", "bad-data", "no-result"] * 4 + ["deleted"] * 3
    jobs: dict[str, tuple[str, bool]] = {}
    cursor = collections.Counter()  # per plan: where its jobs' crashes go next
    for i, plan in enumerate(plans):
        # Pools go to every plan, the failing ones too, and to every deleted job (its release).
        name, pool = f"chaos-{i}", i % 3 == 0 or plan == "deleted"
        # Three crashes a job. A pool job's first is its pool's creation; the others walk the
        # plan's windows in turn, so each kind of window is armed on three jobs or more (one
        # armed window can be passed unfired: see below).
        points = [created("NodePool")] if pool else []
        while len(points) < 3:
            points.append(WINDOWS[plan][cursor[plan] % len(WINDOWS[plan])])
            cursor[plan] += 1
        if plan == "deleted":
            points.append(RELEASED_NODE_POOL)
        for point in points:
            crashes.arm(point, namespace, name)
        jobs[name] = (plan, pool)
    armed = crashes.armed
    assert {point for point, _ in armed} == {w for plan, pool in jobs.values() for w in _windows(plan, pool)}
    operator = OperatorProcess(kubeconfig, namespace, tmp_path / "operator.log",
                               env={**KARPENTER_ENV, **crashes.env}).start()
    supervisor = Supervisor(operator)
    uids = {}
    try:
        supervisor.start()
        for name, (plan, pool) in jobs.items():
            spec = {"backoffLimit": 2}
            if pool:
                spec |= {"nodePool": {"provisioner": "karpenter"},
                         "resources": {"accelerator": "none", "cpu": "2", "memory": "4Gi"}}
            uids[name] = kubectl.create(job_manifest(name, **spec))["metadata"]["uid"]
            time.sleep(rng.uniform(0, 0.5))
        pending = dict(jobs)
        deadline = time.monotonic() + 900
        retried: set[str] = set()
        while pending and time.monotonic() < deadline:
            for name, (plan, _) in list(pending.items()):
                ftj = kubectl.get("ftj", name)
                phase = (ftj or {}).get("status", {}).get("phase")
                if phase in ("Succeeded", "Failed") or (plan == "deleted" and (not ftj or ftj["metadata"].get("deletionTimestamp"))):
                    del pending[name]
                    continue
                live = [p for p in kubectl.items("pods", f"finetune.ai/job={name}")
                        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
                        and "kwok.finetune.ai/exit-code" not in p["metadata"].get("annotations", {})]
                if phase != "Running" or not live:
                    continue  # finish pods only once Running is written: the status-Running window is on every path
                pod = live[0]
                if plan == "deleted":
                    kubectl("delete", "ftj", name, "--wait=false")
                elif plan == "succeed" or (plan == "retry-then-succeed" and name in retried):
                    finish_pod(kubectl, pod, 0, json.dumps(RESULT))
                elif plan == "retry-then-succeed":
                    finish_pod(kubectl, pod, 1, "transient failure")
                    retried.add(name)
                elif plan == "bad-data":
                    finish_pod(kubectl, pod, 2, "dataset line 3: not valid JSON")
                else:
                    finish_pod(kubectl, pod, 0)
            time.sleep(0.5)
        assert not pending, f"jobs still going after 900 s: {sorted(pending)}"

        for name, (plan, _) in jobs.items():
            uid = uids[name]
            if plan == "deleted":
                wait_for(lambda name=name: kubectl.get("ftj", name) is None, 120, what=f"{name} to be deleted (its finalizer)")
                wait_for(lambda name=name: not any(kubectl.items(kind, f"finetune.ai/job={name}") for kind in CHILD_KINDS),
                         120, what=f"the garbage collector to delete {name}'s children")
            else:
                phase, reason = EXPECTED[plan]
                ftj = wait_phase(kubectl, phase, name, timeout=120)
                assert condition(ftj, phase)["reason"] == reason, (name, ftj["status"])
                for kind in ("jobs", "configmaps", "secrets", "networkpolicies"):
                    assert len(kubectl.items(kind, f"finetune.ai/job={name}")) == 1, (name, kind)
                model = kubectl.get("model", name)
                assert (model is not None) == (phase == "Succeeded"), name
                if model:  # a crash between its create and its status patch must not leave it unready
                    assert model["spec"]["sourceJob"]["uid"] == uid and model["status"]["phase"] == "Ready", name
            wait_for(lambda uid=uid: not cluster.items("nodepools.karpenter.sh", f"finetune.ai/job-uid={uid}"),
                     60, what=f"{name}'s NodePool to be released")
        owners = set(uids.values())
        orphans = [obj["metadata"]["name"] for kind in CHILD_KINDS[:-2]
                   for obj in kubectl.items(kind, "app.kubernetes.io/managed-by=finetune-operator")
                   if obj["metadata"]["ownerReferences"][0]["uid"] not in owners]
        # Models outlive their jobs (no ownerReference): each names the job that published it.
        orphans += [m["metadata"]["name"] for m in kubectl.items("models", "app.kubernetes.io/managed-by=finetune-operator")
                    if m["spec"]["sourceJob"]["uid"] not in owners or "ownerReferences" in m["metadata"]]
        assert not orphans
        # Every kill landed mid-work: it is a window reached. A window can be passed without its
        # kill when another job's kill stopped the operator a moment before (the Job created, the
        # process gone before its pass went on), so not every armed one fires; most must, and every
        # kind of window must be hit.
        fired = crashes.fired
        assert fired <= armed and len(fired) >= 0.8 * len(armed), (len(fired), len(armed), armed - fired)
        assert {point for point, _ in fired} == {point for point, _ in armed}
        assert supervisor.restarts >= len(fired)
        summary = {"armed": len(armed), "crashes": len(fired), "restarts": supervisor.restarts, "jobs": len(jobs),
                   "windows": sorted({point for point, _ in fired})}
        print(f"\nchaos summary: {json.dumps(summary)}")
        (REPO / ".cluster").mkdir(exist_ok=True)
        (REPO / ".cluster" / "chaos-summary.json").write_text(json.dumps(summary))
    finally:
        supervisor.stop()
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
    # In its own process group, stopped whole if it overruns: the script's children (an image
    # build, when the tree changed) must not outlive the test.
    up = subprocess.Popen([str(REPO / "hack" / "cluster.sh"), "up"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = up.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(up.pid, signal.SIGKILL)
        up.wait()
        raise
    assert up.returncode == 0, err.decode()[-2000:]
    wait_for(lambda: kubectl("get", "--raw", "/readyz", check=False).returncode == 0, 60, what="the API server")
    finish_pod(kubectl, pod, 0, json.dumps(RESULT))
    wait_phase(kubectl, "Succeeded", timeout=90)
    assert operator.proc.poll() is None, "the operator exited instead of reconnecting"
