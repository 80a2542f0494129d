"""Node pools against the real control plane and Karpenter's KWOK provider: a job's NodePool
becomes NodeClaims and nodes with GPUs, the trainer pods land there, and when the job ends the
pool and its nodes go away."""

from __future__ import annotations

import json
import signal
import time

import pytest
from test_operator import RESULT, condition, finish_pod, job_manifest, result_in_world, running_pod, wait_phase

from kubetools import Kubectl, wait_for

KARPENTER_ENV = {
    "FINETUNE_KARPENTER_NODE_CLASS": json.dumps({"group": "karpenter.kwok.sh", "kind": "KWOKNodeClass", "name": "default"}),
    "FINETUNE_CPU_POOL_REQUIREMENTS": json.dumps([{"key": "karpenter.kwok.sh/instance-family", "operator": "In", "values": ["cpu"]}]),
    "FINETUNE_GPU_POOL_REQUIREMENTS": json.dumps([{"key": "karpenter.kwok.sh/instance-family", "operator": "In", "values": ["gpu"]}]),
    "FINETUNE_PROVISIONING_TIMEOUT_SECONDS": "120",
}

pytestmark = pytest.mark.usefixtures("claims")


@pytest.fixture
def karpenter(kubeconfig):
    cluster = Kubectl(kubeconfig)
    if cluster("get", "crd", "nodepools.karpenter.sh", check=False).returncode != 0:
        pytest.fail("Karpenter is not running: start the cluster with `hack/cluster.sh up --karpenter` (make test does)")
    return cluster


@pytest.fixture
def operator_env():
    return KARPENTER_ENV


def node_pools(cluster: Kubectl, uid: str) -> list[dict]:
    return cluster.items("nodepools.karpenter.sh", f"finetune.ai/job-uid={uid}")


def pool_nodes(cluster: Kubectl, uid: str) -> list[dict]:
    return cluster.items("nodes", f"karpenter.sh/nodepool=finetune-{uid}")


def gpu_job(name="demo", nodes=1, gpus=1, **spec):
    return job_manifest(
        name,
        resources={"accelerator": "nvidia.com/gpu", "acceleratorsPerNode": gpus, "cpu": "8", "memory": "64Gi"},
        training={"microBatchSize": 1, "globalBatchSize": nodes * gpus},
        distributed={"nodes": nodes, "zeroStage": 2},
        nodePool={"provisioner": "karpenter"},
        **spec,
    )


def test_gpu_job_gets_its_own_pool_which_goes_away_when_done(kubectl, karpenter, operator):
    uid = kubectl.create(gpu_job())["metadata"]["uid"]
    (pool,) = wait_for(lambda: node_pools(karpenter, uid), 30, what="the job's NodePool")
    assert pool["spec"]["limits"] == {"nodes": "1"}
    ftj = wait_phase(kubectl, "Provisioning", timeout=30)
    assert condition(ftj, "Provisioned")["status"] == "False"

    pod = running_pod(kubectl, timeout=120)
    (node,) = pool_nodes(karpenter, uid)
    assert pod["spec"]["nodeName"] == node["metadata"]["name"]
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "1"
    assert karpenter.items("nodeclaims.karpenter.sh", f"karpenter.sh/nodepool=finetune-{uid}")
    assert condition(wait_phase(kubectl, "Running"), "Provisioned")["status"] == "True"

    finish_pod(kubectl, pod, 0, json.dumps(RESULT))
    wait_phase(kubectl, "Succeeded")
    wait_for(lambda: not node_pools(karpenter, uid), 30, what="the NodePool to be deleted")
    wait_for(lambda: not pool_nodes(karpenter, uid), 120, what="the pool's nodes to go away")


def test_two_nodes_of_eight_gpus_run_as_one_gang_and_restart_together(kubectl, karpenter, operator):
    uid = kubectl.create(gpu_job(nodes=2, gpus=8, backoffLimit=2))["metadata"]["uid"]

    def both_running():
        pods = [p for p in kubectl.items("pods", "finetune.ai/job=demo") if p["status"].get("phase") == "Running"]
        return pods if len(pods) == 2 else None

    first = both_running_pods = wait_for(both_running, 180, what="both trainer pods running")
    nodes = pool_nodes(karpenter, uid)
    assert len(nodes) == 2 and all(n["status"]["allocatable"]["nvidia.com/gpu"] == "8" for n in nodes)
    assert {p["spec"]["nodeName"] for p in both_running_pods} == {n["metadata"]["name"] for n in nodes}
    assert kubectl.get("service", "demo-trainer")["spec"]["clusterIP"] == "None"
    wait_phase(kubectl, "Running")

    # One member fails: the whole attempt restarts, both indexes get fresh pods.
    by_index = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p for p in first}
    finish_pod(kubectl, by_index["1"], 1, "NCCL watchdog timeout")
    old = {p["metadata"]["name"] for p in first}

    def new_attempt():
        pods = [p for p in kubectl.items("pods", "finetune.ai/job=demo")
                if p["status"].get("phase") == "Running" and p["metadata"]["name"] not in old]
        return pods if len(pods) == 2 else None

    second = wait_for(new_attempt, 120, what="a new attempt with both pods")
    # The Job controller replaces only the failed index; the operator ended the healthy one.
    assert (f"restarting the attempt of {kubectl.namespace}/demo: deleting pod {by_index['0']['metadata']['name']}, "
            "whose peer failed") in operator.log
    by_index = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p for p in second}
    finish_pod(kubectl, by_index["0"], 0, json.dumps(result_in_world(nodes=2, per_node=8)))
    finish_pod(kubectl, by_index["1"], 0)
    ftj = wait_phase(kubectl, "Succeeded", timeout=60)
    assert ftj["status"]["model"] == "demo"
    wait_for(lambda: not node_pools(karpenter, uid), 30, what="the NodePool to be deleted")


@pytest.mark.parametrize("beside", ["alone", "beside another job's pool"])
def test_impossible_instance_type_fails_clearly_and_leaves_nothing(kubectl, karpenter, operator, beside):
    """Karpenter words it in two ways: with no other NodePool ("filtered out all available instance
    types"), and with other jobs' pools, whose refusals are all its message says."""
    if beside == "alone":  # earlier tests' pools are released in the background
        wait_for(lambda: not karpenter.items("nodepools.karpenter.sh"), 120, what="no NodePool in the cluster")
    else:
        other = kubectl.create(gpu_job("other"))["metadata"]["uid"]
        wait_for(lambda: pool_nodes(karpenter, other), 60, what="the other job's node")
    manifest = gpu_job()
    manifest["spec"]["resources"]["instanceType"] = "gpu-does-not-exist"
    uid = kubectl.create(manifest)["metadata"]["uid"]
    ftj = wait_phase(kubectl, "Failed", timeout=90)
    failed = condition(ftj, "Failed")
    assert failed["reason"] == "NoInstanceType"
    assert "instance type gpu-does-not-exist" in failed["message"]
    if beside != "alone":
        # Karpenter's words about the other pool, which it tried: its limit, or its taint
        assert f"NodePool=finetune-{other}" in failed["message"] or "did not tolerate taint" in failed["message"]
        assert kubectl.get("ftj", "other")["status"]["phase"] in ("Provisioning", "Pending", "Running")
    wait_for(lambda: not node_pools(karpenter, uid), 30, what="the NodePool to be deleted")
    wait_for(lambda: kubectl.get("job", "demo-trainer") is None, 30, what="the trainer Job to be deleted")
    assert not pool_nodes(karpenter, uid)


def test_existing_nodes_by_selector(kubectl, operator):
    kubectl.create(job_manifest(nodePool={"provisioner": "existing", "nodeSelector": {"kubernetes.io/hostname": "gpu-node-0"}}))
    assert running_pod(kubectl)["spec"]["nodeName"] == "gpu-node-0"
    wait_phase(kubectl, "Running")


def test_none_provisioner_uses_plain_requests(kubectl, karpenter, operator):
    uid = kubectl.create(job_manifest(nodePool={"provisioner": "none"},
                                      resources={"accelerator": "nvidia.com/gpu", "acceleratorsPerNode": 2, "cpu": "4", "memory": "8Gi"},
                                      training={"microBatchSize": 1, "globalBatchSize": 2}))["metadata"]["uid"]
    pod = running_pod(kubectl)
    assert pod["spec"]["nodeName"] == "gpu-node-0"  # the only node with GPUs
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert not node_pools(karpenter, uid)


def test_operator_restart_mid_provisioning_makes_no_duplicate_pool(kubectl, karpenter, operator):
    uid = kubectl.create(gpu_job())["metadata"]["uid"]
    wait_for(lambda: node_pools(karpenter, uid), 30, what="the NodePool")
    for _ in range(3):
        operator.kill(signal.SIGKILL)
        operator.start()
        time.sleep(1)
    operator.wait_leading()
    pod = running_pod(kubectl, timeout=120)
    assert len(node_pools(karpenter, uid)) == 1
    assert len(kubectl.items("jobs")) == 1
    finish_pod(kubectl, pod, 0, json.dumps(RESULT))
    wait_phase(kubectl, "Succeeded")


def test_deleting_a_job_releases_its_pool(kubectl, karpenter, operator):
    uid = kubectl.create(gpu_job())["metadata"]["uid"]
    running_pod(kubectl, timeout=120)
    kubectl("delete", "ftj", "demo", "--timeout=60s")
    wait_for(lambda: not node_pools(karpenter, uid), 30, what="the NodePool to be deleted")
    wait_for(lambda: not pool_nodes(karpenter, uid), 120, what="the pool's nodes to go away")

