"""A trainer pod that was scheduled but cannot mount what it needs (here: a credentials Secret
that does not exist; the operator may not read Secrets, so it cannot check them before creating
the Job) must fail the job as Failed/ConfigError with the kubelet's own words, not sit Pending
holding its node.

kwok cannot produce this: its pod-ready stage makes every pod on its nodes Running, and it flips
a Pending pod back to Running whenever its Ready condition is not True, so a status written over
a kwok pod does not stay. So the test brings its own Node, which neither kwok (it manages only
nodes annotated kwok.x-k8s.io/node=fake) nor anything else runs, and plays that node's kubelet:
it writes the pod status a kubelet writes while a volume cannot be set up (container waiting in
ContainerCreating) through the status subresource, and the FailedMount Event the kubelet reports.
The Node is tainted so that nothing else in the shared cluster lands on it."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from test_operator import condition, job_manifest, wait_phase

from kubetools import Kubectl, wait_for

pytestmark = pytest.mark.usefixtures("claims")

TAINT = "test.example.com/mount-node"
MESSAGE = 'MountVolume.SetUp failed for volume "base-model-credentials" : secret "hf-token-missing" not found'


@pytest.fixture
def operator_env() -> dict[str, str]:
    return {"FINETUNE_MOUNT_TIMEOUT_SECONDS": "4"}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def node(kubeconfig: str, namespace: str):
    """A Ready Node no kubelet runs (see the module docstring)."""
    cluster = Kubectl(kubeconfig)
    name = f"mount-{namespace}"[:63]
    cluster.create({"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                    "spec": {"taints": [{"key": TAINT, "value": "true", "effect": "NoSchedule"}]}})
    now = _now()
    cluster.merge_patch("node", name, {"status": {
        "capacity": {"cpu": "16", "memory": "64Gi", "pods": "110"},
        "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test node",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}]}}, subresource="status")
    yield name
    cluster("delete", "node", name, "--wait=false", check=False)


def test_a_missing_credentials_secret_fails_the_job_with_the_kubelets_message(kubectl, operator, node):
    kubectl.apply(job_manifest(
        "nosecret",
        baseModel={"source": "hf://org/model", "credentialsSecret": "hf-token-missing"},
        nodePool={"provisioner": "existing", "nodeSelector": {"kubernetes.io/hostname": node},
                  "tolerations": [{"key": TAINT, "operator": "Exists", "effect": "NoSchedule"}]}))

    def scheduled():
        pods = [p for p in kubectl.items("pods", "finetune.ai/job=nosecret") if p["spec"].get("nodeName") == node]
        return pods[0] if pods else None

    pod = wait_for(scheduled, 60, what="the trainer pod to be scheduled on the test node")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["base-model-credentials"]["secret"]["secretName"] == "hf-token-missing"
    name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
    scheduled_at = next(c["lastTransitionTime"] for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
    # What the kubelet writes while it cannot set the pod's volumes up, and the Event it reports.
    kubectl.merge_patch("pod", name, {"status": {
        "phase": "Pending",
        "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": scheduled_at},
                       {"type": "Ready", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": _now()}],
        "containerStatuses": [{"name": "trainer", "image": pod["spec"]["containers"][0]["image"], "imageID": "",
                               "ready": False, "restartCount": 0, "started": False,
                               "state": {"waiting": {"reason": "ContainerCreating"}}}]}}, subresource="status")
    kubectl.create({"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": f"{name}."},
                    "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": name, "namespace": kubectl.namespace, "uid": uid},
                    "reason": "FailedMount", "message": MESSAGE, "type": "Warning", "source": {"component": "kubelet", "host": node},
                    "firstTimestamp": _now(), "lastTimestamp": _now(), "count": 1})
    ftj = wait_phase(kubectl, "Failed", "nosecret", timeout=60)
    failed = condition(ftj, "Failed")
    assert failed["reason"] == "ConfigError", json.dumps(ftj["status"])
    assert failed["message"] == f"pod {name} cannot start: {MESSAGE}"
    # The operator stops the trainer Job, so the pod no longer holds the node.
    wait_for(lambda: kubectl.get("job", "nosecret-trainer") is None or
             kubectl.get("job", "nosecret-trainer")["metadata"].get("deletionTimestamp"), 60,
             what="the trainer Job to be deleted")
