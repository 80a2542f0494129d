"""Kopf handlers: thin entry points that hand every FineTuneJob to `reconcile`.

Four triggers feed the same level-triggered reconcile: the FineTuneJob itself (create, resume
after an operator restart, and the lifecycle edits the CRD allows), any change of a trainer Job
it owns, a periodic resync that makes a missed watch event harmless, and, for finished jobs with
ttlSecondsAfterFinished, a timer that expires them. Deleting a job with a Karpenter pool runs one
more handler, behind a finalizer, that releases the pool.
"""

from __future__ import annotations

import logging

import kopf

from .api import GROUP, TERMINAL_PHASES, VERSION, FineTuneJob
from .naming import JOB_LABEL
from .reconcile import reconcile, release_node_pool
from .settings import OperatorSettings

FTJ = (GROUP, VERSION, "finetunejobs")
operator_settings = OperatorSettings()


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_) -> None:
    # Keep Kopf's bookkeeping in annotations: the status schema is structural and owned by us.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Only jobs with a Karpenter pool get a finalizer: the pool is cluster-scoped, so the garbage
    # collector cannot delete it through an ownerReference.
    settings.persistence.finalizer = f"{GROUP}/node-pool"
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 30
    settings.execution.max_workers = 8
    settings.batching.error_delays = [1, 2, 5, 10, 20, 30]


@kopf.on.create(*FTJ)
@kopf.on.resume(*FTJ)
@kopf.on.update(*FTJ)
async def finetunejob_changed(name: str, namespace: str, **_) -> None:
    await reconcile(namespace, name, operator_settings)


@kopf.on.event("batch", "v1", "jobs", labels={JOB_LABEL: kopf.PRESENT})
async def trainer_job_changed(labels: dict, namespace: str, **_) -> None:
    await reconcile(namespace, labels[JOB_LABEL], operator_settings)


@kopf.timer(*FTJ, interval=operator_settings.resync_seconds, initial_delay=operator_settings.resync_seconds,
            when=lambda status, **_: status.get("phase") not in TERMINAL_PHASES)
async def resync(name: str, namespace: str, **_) -> None:
    await reconcile(namespace, name, operator_settings)


@kopf.timer(*FTJ, interval=5, when=lambda spec, status, **_: status.get("phase") in TERMINAL_PHASES
            and spec.get("ttlSecondsAfterFinished") is not None)
async def expire_finished(name: str, namespace: str, **_) -> None:
    await reconcile(namespace, name, operator_settings)


def _uses_karpenter(spec: dict, **_) -> bool:
    provisioner = (spec.get("nodePool") or {}).get("provisioner") or operator_settings.default_provisioner
    return provisioner == "karpenter"


@kopf.on.delete(*FTJ, when=_uses_karpenter)
async def finetunejob_deleted(body: dict, **_) -> None:
    await release_node_pool(FineTuneJob.model_validate(body), operator_settings)
