"""Names and labels of the objects the operator creates for a FineTuneJob."""

from __future__ import annotations

import re

from .api import DNS_LABEL, FineTuneJob

MANAGED_BY = "finetune-operator"
JOB_LABEL = "finetune.ai/job"  # value: the FineTuneJob's name; selects every child
COMPONENT_LABEL = "app.kubernetes.io/component"
# The Job controller's annotation on each pod of an Indexed Job: the pod's node rank.
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
TRAINER_CONTAINER = "trainer"  # the container in every trainer pod


def is_dns_label(name: str) -> bool:
    """A namespace's name, and a FineTuneJob's (the CRD holds it to the same rule)."""
    return len(name) <= 63 and re.fullmatch(DNS_LABEL, name) is not None


def trainer_job_name(job_name: str) -> str:
    """The batch Job and its headless Service share this name."""
    return f"{job_name}-trainer"


def trainer_name(job: FineTuneJob) -> str:
    return trainer_job_name(job.metadata.name)


def config_map_name(job: FineTuneJob) -> str:
    return f"{job.metadata.name}-trainer-config"


def labels(job: FineTuneJob, component: str = "trainer") -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "finetune-trainer",
        "app.kubernetes.io/instance": job.metadata.name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        COMPONENT_LABEL: component,
        JOB_LABEL: job.metadata.name,
    }


def owner_reference(job: FineTuneJob) -> dict:
    """Children are owned by the FineTuneJob, so deleting it lets the garbage collector cascade."""
    return {
        "apiVersion": job.api_version,
        "kind": job.kind,
        "name": job.metadata.name,
        "uid": job.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def controlled_by(obj: dict, uid: str | None) -> bool:
    """Whether obj's controller (its one ownerReference with controller: true) is the object `uid`."""
    return any(ref.get("controller") and ref.get("uid") == uid
               for ref in (obj.get("metadata", {}).get("ownerReferences") or []))
