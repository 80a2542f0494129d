"""Render the trainer's config file from a FineTuneJob.

The trainer (finetune_trainer) owns the schema; this module only maps the job's spec onto it,
with every URI resolved to the path where the pod sees it. The result is validated against the
trainer's own pydantic model, so the operator can never hand the trainer a config it rejects.
"""

from __future__ import annotations

from typing import Any

from finetune_trainer.config import JobConfig

from . import sources
from .api import FineTuneJob

CONFIG_DIR = "/etc/finetune"
CONFIG_FILE = "config.yaml"
TOKEN_DIR = "/var/run/secrets/finetune/base-model"
PROGRESS_TOKEN_DIR = "/var/run/secrets/finetune/progress"
TERMINATION_LOG = "/dev/termination-log"
METRICS_PORT = 9090


def resolved_sources(job: FineTuneJob, claim_dirs: dict[str, str] | None = None) -> dict[str, sources.Resolved]:
    spec = job.spec
    return {
        "baseModel": sources.resolve(spec.base_model.source, "baseModel.source", claim_dirs=claim_dirs),
        "dataset": sources.resolve(spec.dataset.source, "dataset.source", claim_dirs=claim_dirs),
        "output": sources.resolve(spec.output.destination, "output.destination", writable=True, claim_dirs=claim_dirs),
    }


def in_cluster_reporting(job: FineTuneJob, progress_url: str = "") -> dict[str, Any]:
    reporting: dict[str, Any] = {"metricsPort": METRICS_PORT, "terminationMessagePath": TERMINATION_LOG}
    if progress_url:
        reporting["progressUrl"] = (f"{progress_url.rstrip('/')}/v1/namespaces/{job.metadata.namespace}"
                                    f"/finetunejobs/{job.metadata.name}/progress")
        reporting["progressTokenFile"] = f"{PROGRESS_TOKEN_DIR}/token"
    return reporting


def render(job: FineTuneJob, model_manifest: dict[str, Any] | None = None, *,
           claim_dirs: dict[str, str] | None = None, reporting: dict[str, Any] | None = None,
           progress_url: str = "") -> dict[str, Any]:
    """The trainer config as a plain dict (camelCase), validated by the trainer's schema.

    In a pod (the default) URIs resolve to the pod's mount paths; a local run passes
    `claim_dirs` to map each pvc:// claim to a directory, and its own `reporting`."""
    spec = job.spec
    resolved = resolved_sources(job, claim_dirs)
    config = {
        "jobName": job.metadata.name,
        "baseModel": {
            "source": resolved["baseModel"].value,
            "revision": spec.base_model.revision,
            "tokenFile": f"{TOKEN_DIR}/token" if spec.base_model.credentials_secret else None,
        },
        "dataset": {
            "path": resolved["dataset"].value,
            "sha256": spec.dataset.sha256,
            "format": spec.dataset.format,
            "validationSplit": spec.dataset.validation_split,
            "skipBadLines": spec.dataset.skip_bad_lines,
        },
        "method": spec.method.to_wire(),
        "training": spec.training.to_wire(),
        "distributed": {"zeroStage": spec.distributed.zero_stage, "offload": spec.distributed.offload},
        "output": {"dir": resolved["output"].value},
        "checkpointing": spec.checkpointing.to_wire(),
        "reporting": reporting if reporting is not None else in_cluster_reporting(job, progress_url),
        "modelManifest": model_manifest,
    }
    return JobConfig.model_validate(config).model_dump(by_alias=True, exclude_none=True, mode="json")
