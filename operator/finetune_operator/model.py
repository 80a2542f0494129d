"""The Model a successful FineTuneJob publishes.

The manifest itself comes from `finetune_trainer.model_manifest.render_model`, the function the
trainer writes model.yaml with, fed the same `PublishConfig` the trainer got in its config; this
module adds only the Kubernetes parts (labels, the ownerReference when the job asks for one,
the Ready condition).
"""

from __future__ import annotations

from datetime import datetime, timezone

from finetune_trainer.config import DatasetRef, ModelBaseRef, PublishConfig, SourceJobRef
from finetune_trainer.model_manifest import model_metrics, render_model
from finetune_trainer.result import TrainerResult

from . import naming
from .api import Condition, FineTuneJob, ModelStatus


def publish_config(job: FineTuneJob) -> PublishConfig:
    """What the Model says about the job, in the user's terms (the trainer gets it too)."""
    spec = job.spec
    return PublishConfig(
        name=job.model_name,
        namespace=job.metadata.namespace,
        uri=spec.output.destination,
        base_model=ModelBaseRef(source=spec.base_model.source, revision=spec.base_model.revision),
        dataset=DatasetRef(source=spec.dataset.source, sha256=spec.dataset.sha256),
        source_job=SourceJobRef(name=job.metadata.name, uid=job.metadata.uid or ""),
    )


def build_model(job: FineTuneJob, result: TrainerResult) -> dict:
    """The Model object (without status: status is a subresource, written separately)."""
    manifest = render_model(publish_config(job), job.spec.method, job.spec.training, result)
    manifest.pop("status")
    manifest["metadata"]["labels"] = naming.labels(job, component="model")
    # A Model outlives its job by default, as its weights on the volume do (deleting a finished
    # job, or its TTL, must not unpublish a model someone serves); the reference that lets the
    # garbage collector delete it is there only when the spec asks.
    if job.spec.output.delete_model_with_job:
        manifest["metadata"]["ownerReferences"] = [naming.owner_reference(job)]
    return manifest


def model_to_validate(job: FineTuneJob) -> dict:
    """The Model this job would publish, with placeholder digests and metrics: what the API
    server is asked to accept (dry run) before anything is created, so a name or namespace it
    would refuse fails the job at the start, not after training."""
    weights = "model.safetensors" if job.spec.method.type == "full" else "adapter_model.safetensors"
    placeholder = TrainerResult.model_validate({
        "files": {weights: {"sha256": "0" * 64, "size": 0}},
        "metrics": {"trainLoss": 0.0, "steps": 1, "tokens": 0},
        "world": {"worldSize": 1, "nodes": 1, "processesPerNode": 1},
    })
    return build_model(job, placeholder)


def model_status(result: TrainerResult, generation: int | None, now: datetime | None = None) -> dict:
    now = now or datetime.now(timezone.utc)
    status = ModelStatus(
        phase="Ready",
        conditions=[
            Condition(
                type="Ready",
                status="True",
                reason="Published",
                message="weights written and verified by the trainer",
                last_transition_time=now.replace(microsecond=0),
                observed_generation=generation,
            )
        ],
        metrics=model_metrics(result),
    )
    return status.model_dump(by_alias=True, exclude_none=True, mode="json")


def published_here(existing: dict, built: dict, job: FineTuneJob) -> bool:
    """Whether an existing Model is the one this job publishes, not a namesake or a forgery.

    `sourceJob.uid` alone proves nothing: anyone who may create Models can copy a job's UID into
    one with their own URI and digest, and the operator would then mark it Ready as "verified by
    the trainer". So the whole spec must be exactly the one built from this job's result (its
    URI, every digest, the job's UID): that is a create the operator itself made, found again
    after a restart, or a copy that says nothing but the truth. When the job asked for its Model
    to be deleted with it, the Model must also carry that reference, or the promise would not
    hold."""
    controlled = any(ref.get("controller") and ref.get("uid") == job.metadata.uid
                     for ref in existing.get("metadata", {}).get("ownerReferences", []) or [])
    return existing.get("spec") == built["spec"] and (controlled or not job.spec.output.delete_model_with_job)
