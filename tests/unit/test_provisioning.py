import json

import pytest
from factories import make_job

from finetune_operator import children, provisioning, status
from finetune_operator.settings import OperatorSettings

KWOK_CLASS = json.dumps({"group": "karpenter.kwok.sh", "kind": "KWOKNodeClass", "name": "default"})
SETTINGS = OperatorSettings(karpenter_node_class=KWOK_CLASS,
                            cpu_pool_requirements='[{"key": "karpenter.kwok.sh/instance-family", "operator": "In", "values": ["cpu"]}]')


def karpenter_job(**spec):
    return make_job(nodePool={"provisioner": "karpenter", "capacityType": "spot"}, **spec)


def test_node_pool_for_a_gpu_job():
    ftj = karpenter_job(distributed={"nodes": 2}, resources={"acceleratorsPerNode": 8, "instanceType": "gpu-8xh100"},
                        training={"microBatchSize": 2, "globalBatchSize": 32})
    pool = provisioning.build_node_pool(ftj, SETTINGS)
    assert pool["metadata"]["name"] == "finetune-uid-1"
    assert pool["metadata"]["labels"]["finetune.ai/job-uid"] == "uid-1"
    template = pool["spec"]["template"]["spec"]
    assert template["nodeClassRef"] == json.loads(KWOK_CLASS)
    assert {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["spot"]} in template["requirements"]
    assert {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["gpu-8xh100"]} in template["requirements"]
    assert template["taints"] == [{"key": "finetune.ai/job", "value": "uid-1", "effect": "NoSchedule"}]
    assert pool["spec"]["limits"] == {"nodes": "2"}
    assert pool["spec"]["disruption"]["consolidateAfter"] == "Never"
    assert pool["spec"]["disruption"]["budgets"] == [{"nodes": "0", "reasons": ["Drifted", "Underutilized", "Empty"]}]
    assert "ownerReferences" not in pool["metadata"]  # cluster-scoped


def test_cpu_pool_gets_cpu_requirements():
    pool = provisioning.build_node_pool(karpenter_job(resources={"accelerator": "none"}), SETTINGS)
    assert {"key": "karpenter.kwok.sh/instance-family", "operator": "In", "values": ["cpu"]} in pool["spec"]["template"]["spec"]["requirements"]


def test_pods_tolerate_only_their_pool_and_are_not_disrupted():
    job = children.build_job(karpenter_job(), SETTINGS)
    template = job["spec"]["template"]
    assert template["spec"]["nodeSelector"] == {"karpenter.sh/nodepool": "finetune-uid-1"}
    assert template["spec"]["tolerations"] == [{"key": "finetune.ai/job", "operator": "Equal", "value": "uid-1", "effect": "NoSchedule"}]
    assert template["metadata"]["annotations"] == {"karpenter.sh/do-not-disrupt": "true"}


def test_existing_and_none_create_no_pool():
    for mode in ("existing", "none"):
        assert provisioning.build_node_pool(make_job(nodePool={"provisioner": mode}), SETTINGS) is None


def test_default_provisioner_comes_from_settings():
    settings = OperatorSettings(default_provisioner="karpenter", karpenter_node_class=KWOK_CLASS)
    assert provisioning.build_node_pool(make_job(), settings) is not None


def test_missing_node_class_is_a_clear_error():
    with pytest.raises(ValueError, match="nodeClassRef is unset"):
        provisioning.build_node_pool(karpenter_job(), OperatorSettings())


def _pod(name, phase, created, finished=None):
    pod = {"metadata": {"name": name, "creationTimestamp": created}, "status": {"phase": phase}}
    if finished:
        pod["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {"exitCode": 1, "finishedAt": finished}}}]
    return pod


def test_a_failed_peer_ends_the_attempt():
    pods = [_pod("a", "Failed", "t1", finished="t3"), _pod("b", "Running", "t1"), _pod("c", "Pending", "t4")]
    assert status.stale_gang_members(pods) == ["b"]  # c belongs to the new attempt
    assert status.stale_gang_members([_pod("b", "Running", "t1")]) == []


def test_provisioning_states():
    ftj = karpenter_job()
    job = {"metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"}, "status": {}}
    pending = [{"metadata": {"name": "p"}, "spec": {}, "status": {"phase": "Pending"}}]
    from datetime import datetime, timezone
    soon, late = datetime(2026, 1, 1, 0, 1, tzinfo=timezone.utc), datetime(2026, 1, 1, 1, 0, tzinfo=timezone.utc)
    obs = status.observe(ftj, job, pending, status.Provisioning((), 900), soon)
    assert (obs.phase, obs.reason) == ("Provisioning", "WaitingForCapacity")
    limit = status.Provisioning((("FailedScheduling", "all available instance types exceed limits for nodepool"),), 900)
    assert status.observe(ftj, job, pending, limit, soon).reason == "NodePoolLimitReached"
    none_fit = status.Provisioning((("NoCompatibleInstanceTypes", "NodePool requirements filtered out all compatible available instance types"),), 900)
    obs = status.observe(ftj, job, pending, none_fit, soon)
    assert (obs.phase, obs.reason) == ("Failed", "NoInstanceType")
    obs = status.observe(ftj, job, pending, status.Provisioning((), 900), late)
    assert (obs.phase, obs.reason) == ("Failed", "ProvisioningTimeout")
