"""Kopf handlers: thin entry points that hand every FineTuneJob to `reconcile`.

Four triggers feed the same level-triggered reconcile: the FineTuneJob itself (create, resume
after an operator restart, the lifecycle edits the CRD allows, and its deletion), any change of a
trainer Job it owns, a periodic resync that makes a missed watch event harmless, and, for
finished jobs with ttlSecondsAfterFinished, a timer that expires them. Deleting a job with a
Karpenter pool runs one more handler, behind a finalizer, that releases the pool.

Nothing here reads the environment: `main` builds the settings once and passes them, with the
per-job state, in Kopf's memo (`memo.settings`, `memo.jobs`; see `make_memo`). The resync timer's
interval is a setting, and Kopf fixes a timer's interval when it is registered, so `main`
registers that timer (`register_resync`) once the settings are read.
"""

from __future__ import annotations

import logging

import kopf

from . import crashpoints
from .api import GROUP, TERMINAL_PHASES, VERSION
from .naming import JOB_LABEL
from .reconcile import JobStates, reconcile, release_node_pool_of
from .settings import OperatorSettings

FTJ = (GROUP, VERSION, "finetunejobs")


def make_memo(settings: OperatorSettings) -> kopf.Memo:
    """The operator's memo. Kopf gives each object a shallow copy, so `jobs` is shared."""
    return kopf.Memo(settings=settings, jobs=JobStates())


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
async def finetunejob_changed(name: str, namespace: str, memo: kopf.Memo, **_) -> None:
    await reconcile(namespace, name, memo.settings, memo.jobs)


@kopf.on.event(*FTJ, when=lambda type, **_: type == "DELETED")
async def finetunejob_gone(name: str, namespace: str, memo: kopf.Memo, **_) -> None:
    await reconcile(namespace, name, memo.settings, memo.jobs)  # finds it gone: drops its state


@kopf.on.event("batch", "v1", "jobs", labels={JOB_LABEL: kopf.PRESENT})
async def trainer_job_changed(labels: dict, namespace: str, memo: kopf.Memo, **_) -> None:
    await reconcile(namespace, labels[JOB_LABEL], memo.settings, memo.jobs)


async def resync(name: str, namespace: str, memo: kopf.Memo, **_) -> None:
    await reconcile(namespace, name, memo.settings, memo.jobs)


def register_resync(interval: float, registry: kopf.OperatorRegistry | None = None) -> None:
    """Reconcile every live FineTuneJob every `interval` seconds (settings.resync_seconds)."""
    kopf.timer(*FTJ, id="resync", interval=interval, initial_delay=interval, registry=registry,
               when=lambda status, **_: status.get("phase") not in TERMINAL_PHASES)(resync)


@kopf.timer(*FTJ, interval=5, when=lambda spec, status, **_: status.get("phase") in TERMINAL_PHASES
            and spec.get("ttlSecondsAfterFinished") is not None)
async def expire_finished(name: str, namespace: str, memo: kopf.Memo, **_) -> None:
    await reconcile(namespace, name, memo.settings, memo.jobs)


def _uses_karpenter(spec: dict, memo: kopf.Memo, **_) -> bool:
    provisioner = (spec.get("nodePool") or {}).get("provisioner") or memo.settings.default_provisioner
    return provisioner == "karpenter"


@kopf.on.delete(*FTJ, when=_uses_karpenter)
async def finetunejob_deleted(uid: str, name: str, namespace: str, memo: kopf.Memo, **_) -> None:
    # By the UID alone: a job whose spec this operator cannot read must still be deletable.
    await release_node_pool_of(uid)
    crashpoints.reached(memo.settings, crashpoints.RELEASED_NODE_POOL, namespace, name)  # the finalizer is still on
