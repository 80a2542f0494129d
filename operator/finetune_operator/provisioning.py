"""Where trainer pods run: one small interface, three provisioners.

- karpenter: a Karpenter v1 NodePool per FineTuneJob. Per job rather than shared per shape,
  because a job's pool carries a taint only that job's pods tolerate (no other workload lands on
  its expensive nodes), its limit is exactly the job's node count, and deleting it when the job
  ends makes Karpenter remove exactly that job's nodes, with no reference counting between jobs.
  Nodes are protected from disruption by the karpenter.sh/do-not-disrupt pod annotation, no
  consolidation and a disruption budget of zero.
- existing: schedule onto existing nodes by nodeSelector and tolerations; provision nothing.
- none: plain resource requests, for clusters with their own autoscaler.
"""

from __future__ import annotations

from typing import Any

from .api import FineTuneJob
from .naming import JOB_LABEL, labels
from .settings import OperatorSettings

KARPENTER_API = "karpenter.sh/v1"
POOL_LABEL = "karpenter.sh/nodepool"
TAINT_KEY = "finetune.ai/job"
JOB_UID_LABEL = "finetune.ai/job-uid"
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
CAPACITY_TYPE_LABEL = "karpenter.sh/capacity-type"


def api_missing(kind: str, api_version: str) -> str | None:
    """The job's failure message when the API server does not serve an object the operator
    creates (a 404 on create, kube.NotServed); for the NodePool: Karpenter is not installed."""
    if kind == "NodePool" and api_version == KARPENTER_API:
        return (f"the {KARPENTER_API.split('/')[0]} NodePool API ({KARPENTER_API}) is not installed in this cluster: "
                "install Karpenter, or set spec.nodePool.provisioner to existing or none")
    return None


def provisioner_of(job: FineTuneJob, settings: OperatorSettings) -> str:
    return job.spec.node_pool.provisioner or settings.default_provisioner


def node_pool_name(job: FineTuneJob) -> str:
    return node_pool_name_of(job.metadata.uid)


def node_pool_name_of(uid: str) -> str:
    """Cluster-scoped, so derived from the job's UID: unique across namespaces and recreations."""
    return f"finetune-{uid}"


def pod_placement(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """nodeSelector / tolerations / annotations for the trainer pod template."""
    pool = job.spec.node_pool
    provisioner = provisioner_of(job, settings)
    if provisioner == "karpenter":
        return {
            "nodeSelector": {POOL_LABEL: node_pool_name(job)},
            "tolerations": [{"key": TAINT_KEY, "operator": "Equal", "value": job.metadata.uid, "effect": "NoSchedule"}],
            "annotations": {"karpenter.sh/do-not-disrupt": "true"},
        }
    placement: dict[str, Any] = {}
    selector = dict(pool.node_selector or {})
    if job.spec.resources.instance_type:
        selector[INSTANCE_TYPE_LABEL] = job.spec.resources.instance_type
    if selector:
        placement["nodeSelector"] = selector
    if pool.tolerations:
        placement["tolerations"] = [t.to_wire() for t in pool.tolerations]
    return placement


def _requirements(job: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    res = job.spec.resources
    reqs: list[dict[str, Any]] = [
        {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
        {"key": CAPACITY_TYPE_LABEL, "operator": "In", "values": [job.spec.node_pool.capacity_type]},
    ]
    if res.instance_type:
        reqs.append({"key": INSTANCE_TYPE_LABEL, "operator": "In", "values": [res.instance_type]})
    extra = settings.cpu_pool_requirements if res.accelerator == "none" else settings.gpu_pool_requirements
    reqs.extend(r.to_wire() for r in extra)
    return reqs


def build_node_pool(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any] | None:
    """The job's NodePool, or None for the provisioners that create nothing."""
    if provisioner_of(job, settings) != "karpenter":
        return None
    class_ref = job.spec.node_pool.node_class_ref
    if class_ref is not None:
        class_ref_wire = class_ref.to_wire()
    elif settings.karpenter_node_class is not None:  # validated at startup (settings.py)
        class_ref_wire = settings.karpenter_node_class.to_wire()
    else:
        # The job asks for karpenter while the operator's default provisioner is another one,
        # which needs no default node class: the job must name its own.
        raise ValueError("nodePool.nodeClassRef is unset and the operator has no default Karpenter node class "
                         "(chart value karpenter.nodeClassRef)")
    pool_labels = {**labels(job, component="node-pool"), JOB_UID_LABEL: job.metadata.uid,
                   "finetune.ai/namespace": job.metadata.namespace}
    return {
        "apiVersion": KARPENTER_API,
        "kind": "NodePool",
        # Cluster-scoped: no ownerReference to the namespaced job is allowed, so the operator
        # deletes it itself (job finished, failed or deleted: a finalizer covers the last case).
        "metadata": {"name": node_pool_name(job), "labels": pool_labels},
        "spec": {
            "template": {
                "metadata": {"labels": {JOB_UID_LABEL: job.metadata.uid, JOB_LABEL: job.metadata.name}},
                "spec": {
                    "nodeClassRef": class_ref_wire,
                    "requirements": _requirements(job, settings),
                    "taints": [{"key": TAINT_KEY, "value": job.metadata.uid, "effect": "NoSchedule"}],
                    "expireAfter": "Never",
                },
            },
            "limits": {"nodes": str(job.spec.distributed.nodes)},
            "disruption": {
                # No consolidation at all: an empty node between two attempts is still the job's,
                # and a finished trainer pod holds the result (its termination message) until the
                # operator has read it. Deleting the pool is what releases the nodes.
                "consolidationPolicy": "WhenEmpty",
                "consolidateAfter": "Never",
                "budgets": [{"nodes": "0", "reasons": ["Drifted", "Underutilized", "Empty"]}],
            },
        },
    }
