"""Build the Model a successful FineTuneJob publishes."""

from __future__ import annotations

from datetime import datetime, timezone

from . import naming
from .api import (
    API_VERSION,
    AdapterSpec,
    Condition,
    DatasetRef,
    FineTuneJob,
    ModelBaseRef,
    ModelMetrics,
    ModelSpec,
    ModelStatus,
    SourceJobRef,
)
from .result import TrainerResult


def model_spec(job: FineTuneJob, result: TrainerResult) -> ModelSpec:
    spec = job.spec
    return ModelSpec(
        base_model=ModelBaseRef(source=spec.base_model.source, revision=spec.base_model.revision),
        adapter=AdapterSpec(
            uri=spec.output.destination,
            format=result.format,
            sha256=result.files[result.weights_file].sha256,
            size_bytes=result.total_size,
            files=result.files_wire(),
        ),
        method=spec.method,
        training=spec.training,
        dataset=DatasetRef(source=spec.dataset.source, sha256=spec.dataset.sha256),
        source_job=SourceJobRef(name=job.metadata.name, uid=job.metadata.uid or ""),
    )


def build_model(job: FineTuneJob, result: TrainerResult) -> dict:
    """The Model object (without status: status is a subresource, written separately)."""
    return {
        "apiVersion": API_VERSION,
        "kind": "Model",
        "metadata": {
            "name": job.model_name,
            "namespace": job.metadata.namespace,
            "labels": naming.labels(job, component="model"),
            # The Model outlives nothing: deleting the job deletes what it published, unless
            # the user removes this reference to keep the Model on its own.
            "ownerReferences": [naming.owner_reference(job)],
        },
        "spec": model_spec(job, result).to_wire(),
    }


def model_status(result: TrainerResult, generation: int | None, now: datetime | None = None) -> dict:
    now = now or datetime.now(timezone.utc)
    m = result.metrics
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
        metrics=ModelMetrics(
            train_loss=m.train_loss,
            eval_loss=m.eval_loss,
            initial_eval_loss=m.initial_eval_loss,
            steps=m.steps,
            tokens_seen=m.tokens,
        ),
    )
    return status.model_dump(by_alias=True, exclude_none=True, mode="json")


def same_lineage(existing: dict, job: FineTuneJob) -> bool:
    """Whether an existing Model was published by this very job (not a namesake)."""
    return existing.get("spec", {}).get("sourceJob", {}).get("uid") == job.metadata.uid


def manifest_template(job: FineTuneJob) -> dict:
    """The Model manifest the trainer completes (adapter digest, metrics) and saves as model.yaml,
    so the output directory describes itself even where no operator reads it."""
    spec = job.spec
    return {
        "apiVersion": API_VERSION,
        "kind": "Model",
        "metadata": {"name": job.model_name, "namespace": job.metadata.namespace},
        "spec": {
            "baseModel": ModelBaseRef(source=spec.base_model.source, revision=spec.base_model.revision).to_wire(),
            "method": spec.method.to_wire(),
            "training": spec.training.to_wire(),
            "dataset": DatasetRef(source=spec.dataset.source, sha256=spec.dataset.sha256).to_wire(),
            "sourceJob": SourceJobRef(name=job.metadata.name, uid=job.metadata.uid or "").to_wire(),
        },
    }
