import json
from datetime import datetime, timedelta, timezone

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
    soon, late = datetime(2026, 1, 1, 0, 1, tzinfo=timezone.utc), datetime(2026, 1, 1, 1, 0, tzinfo=timezone.utc)
    obs = status.observe(ftj, job, pending, status.Provisioning((), 900), soon)
    assert (obs.phase, obs.reason) == ("Provisioning", "WaitingForCapacity")
    limit = status.Provisioning((status.KarpenterEvent("FailedScheduling", "all available instance types exceed limits for nodepool"),), 900)
    assert status.observe(ftj, job, pending, limit, soon).reason == "NodePoolLimitReached"
    alone = status.Provisioning((status.KarpenterEvent(
        "FailedScheduling", "Failed to schedule pod, nodepool requirements filtered out all available instance types"),), 900)
    obs = status.observe(ftj, job, pending, alone, soon)
    assert (obs.phase, obs.reason) == ("Failed", "NoInstanceType")
    obs = status.observe(ftj, job, pending, status.Provisioning((), 900), late)
    assert (obs.phase, obs.reason) == ("Failed", "ProvisioningTimeout")


# Karpenter skips a Ready NodePool whose requirements match no instance type, and its message on the
# pod then lists only the other pools' refusals (other jobs' taints, other pools' labels).
OTHERS = ("Failed to schedule pod, did not tolerate taint (taint=finetune.ai/job=d495de4c:NoSchedule); "
          "incompatible requirements, key karpenter.sh/nodepool, karpenter.sh/nodepool In [finetune-x] "
          "not in karpenter.sh/nodepool In [general]; did not tolerate taint (taint=finetune.ai/job=ba5fab28:NoSchedule); "
          "node limits have been exhausted for nodepool (NodePool=finetune-b8ff4576)")
OWN_POOL = "finetune-own"
OWN_LIMIT = "all available instance types exceed limits for nodepool (NodePool=finetune-own)"
READY = datetime(2026, 1, 1, 0, 0, 10, tzinfo=timezone.utc)


@pytest.mark.parametrize(("message", "at", "ready", "left_out"), [
    (OTHERS, READY + timedelta(seconds=1), READY, True),
    (OTHERS, READY + timedelta(milliseconds=500), READY, False),  # the same second: maybe before Ready
    (OTHERS, READY + timedelta(seconds=5), None, False),  # the pool is not Ready: skipped for that
    (OTHERS, None, READY, False),
    (OTHERS, READY - timedelta(seconds=3), READY, False),  # said before the pool was Ready
    # Any refusal that could be the job's own pool's: it was considered.
    (OTHERS + "; incompatible requirements, key node.kubernetes.io/instance-type, ...", READY + timedelta(seconds=5), READY, False),
    (OTHERS + "; " + OWN_LIMIT, READY + timedelta(seconds=5), READY, False),
    ("Failed to schedule pod, no instance type satisfied resources {\"cpu\":\"900\"}", READY + timedelta(seconds=5), READY, False),
    ("Failed to schedule pod, ", READY + timedelta(seconds=5), READY, False),
])
def test_a_ready_pool_left_out_of_scheduling(message, at, ready, left_out):
    assert status.pool_left_out(status.KarpenterEvent("FailedScheduling", message, at), OWN_POOL, ready) is left_out


@pytest.mark.parametrize(("pod_created", "left_out"), [
    (READY, True),  # created in the second the pool turned Ready: tried a batch idle time later
    (READY + timedelta(milliseconds=900), True),
    (READY + timedelta(seconds=2), True),
    (READY - timedelta(milliseconds=100), False),  # an earlier second: maybe tried before Ready
    (None, False),
])
def test_an_event_in_the_readiness_second_counts_for_a_pod_created_after_it(pod_created, left_out):
    """Karpenter tried the pod in the very second its pool turned Ready (seen in CI): the event's
    time cannot order them, the pod's creation can."""
    event = status.KarpenterEvent("FailedScheduling", OTHERS, READY + timedelta(milliseconds=800), pod_created)
    assert status.pool_left_out(event, OWN_POOL, READY + timedelta(milliseconds=300)) is left_out


def test_only_the_jobs_own_pool_at_its_limit_is_reported():
    ftj = karpenter_job()
    job = {"metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"}, "status": {}}
    pending = [{"metadata": {"name": "p"}, "spec": {}, "status": {"phase": "Pending"}}]
    own = f"all available instance types exceed limits for nodepool (NodePool={provisioning.node_pool_name(ftj)})"
    other = "node limits have been exhausted for nodepool (NodePool=finetune-another)"
    now = READY + timedelta(seconds=30)
    obs = status.observe(ftj, job, pending, status.Provisioning((status.KarpenterEvent("FailedScheduling", f"Failed to schedule pod, {other}; {own}"),)), now)
    assert (obs.reason, obs.message) == ("NodePoolLimitReached", own)
    obs = status.observe(ftj, job, pending, status.Provisioning((status.KarpenterEvent("FailedScheduling", f"Failed to schedule pod, {other}"),)), now)
    assert obs.reason == "WaitingForCapacity"


def test_a_pool_left_out_fails_the_job_and_an_early_event_waits():
    ftj = karpenter_job()
    job = {"metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"}, "status": {}}
    pending = [{"metadata": {"name": "p"}, "spec": {}, "status": {"phase": "Pending"}}]
    now = READY + timedelta(seconds=30)
    late = status.Provisioning((status.KarpenterEvent("FailedScheduling", OTHERS, READY + timedelta(seconds=2)),), 900, READY)
    obs = status.observe(ftj, job, pending, late, now)
    assert (obs.phase, obs.reason) == ("Failed", "NoInstanceType")
    assert "did not tolerate taint" in obs.message
    early = status.Provisioning((status.KarpenterEvent("FailedScheduling", OTHERS, READY - timedelta(seconds=2)),), 900, READY)
    assert status.observe(ftj, job, pending, early, now).reason == "WaitingForCapacity"


# A 404 on create: the resource type is not served (no Karpenter CRDs). Never success.
async def test_a_404_on_create_or_dry_run_is_never_success(monkeypatch):
    from finetune_operator import kube

    async def not_found(*args, **kwargs):
        return None  # what kube._call answers for a 404

    monkeypatch.setattr(kube, "_call", not_found)
    pool = provisioning.build_node_pool(karpenter_job(), SETTINGS)
    with pytest.raises(kube.NotServed, match="karpenter.sh/v1 NodePool"):
        await kube.create(pool)
    with pytest.raises(kube.NotServed):
        await kube.dry_run(pool)


async def test_a_cluster_without_the_nodepool_api_fails_the_job_with_config_error(monkeypatch):
    import copy

    from factories import with_status

    from finetune_operator import kube, reconcile

    raw, _ = with_status(karpenter_job(), {})
    patches, created = [], []

    async def get(kind, namespace, name):
        return copy.deepcopy(raw) if kind == "FineTuneJob" else None

    async def list_(kind, namespace, selector=None, fields=None):
        return []

    async def exists(kind, namespace, name):
        return True

    async def call(method, kind, namespace, path="", **kwargs):
        if kind == "NodePool" and method == "POST":
            return None  # the 404 of a cluster without Karpenter's CRDs
        if method == "POST":
            created.append(kind)
        return {"kind": kind, "metadata": {"name": "x", "uid": "u"}}

    async def patch_status(kind, namespace, name, body):
        patches.append(body)

    monkeypatch.setattr(kube, "get", get)
    monkeypatch.setattr(kube, "list_", list_)
    monkeypatch.setattr(kube, "exists", exists)
    monkeypatch.setattr(kube, "_call", call)
    monkeypatch.setattr(kube, "patch_status", patch_status)
    monkeypatch.setattr(kube, "delete", lambda *a, **k: _false())
    monkeypatch.setattr(reconcile.kopf, "event", lambda *a, **k: None)
    await reconcile.reconcile(raw["metadata"]["namespace"], raw["metadata"]["name"], SETTINGS, reconcile.JobStates())
    assert patches and patches[-1]["phase"] == "Failed"
    failed = next(c for c in patches[-1]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "ConfigError"
    assert "karpenter.sh NodePool API (karpenter.sh/v1) is not installed in this cluster" in failed["message"]
    assert "Job" not in created  # the dry run stopped it before anything was created


async def _false():
    return False
