"""Render the trainer's config file from a FineTuneJob.

The trainer (finetune_trainer.config) owns the schema, and the FineTuneJob's training sections
are its types, so they pass through as they are; this module adds where things are in the pod
(every URI resolved to its mount path, token files, reporting) and the Model to publish. The
result is validated against the trainer's own model, so the operator can never hand the trainer
a config it rejects.
"""

from __future__ import annotations

from typing import Any

from finetune_trainer.config import (
    BaseModelConfig,
    CheckpointingConfig,
    CheckpointingOptions,
    DatasetConfig,
    DatasetOptions,
    DistributedConfig,
    JobConfig,
    OutputConfig,
    ReportingConfig,
    options_of,
)

from . import checkpoint_key, sources
from .api import FineTuneJob
from .model import publish_config

CONFIG_DIR = "/etc/finetune"
CONFIG_FILE = "config.yaml"
TOKEN_DIR = "/var/run/secrets/finetune/base-model"
TOKEN_KEY = "token"  # the one key of a credentials Secret the trainer gets
# Sources whose fetch reads credentials. Only these get their credentialsSecret mounted; the
# dataset's and the output's sources (pvc://, configmap://) read none yet.
CREDENTIAL_SCHEMES = ("hf",)
PROGRESS_TOKEN_DIR = "/var/run/secrets/finetune/progress"
# Where the model cache claim is mounted (settings.model_cache_claim): the hub cache of hf:// models.
MODEL_CACHE_DIR = "/mnt/model-cache"
TERMINATION_LOG = "/dev/termination-log"
METRICS_PORT = 9090
# The pod's own IP, from the downward API (children.build_job): the trainer binds its metrics
# endpoint there, so two trainer pods whose IPs differ never clash on METRICS_PORT even where
# they share one host's ports (process nodes, one per loopback address); a hostNetwork pod's
# IP is its node's, where the scheduler keeps two pods with the same port apart (hostPort).
POD_IP_ENV = "POD_IP"


def resolved_sources(job: FineTuneJob, claim_dirs: dict[str, str] | None = None) -> dict[str, sources.Resolved]:
    spec = job.spec
    return {
        "baseModel": sources.resolve(spec.base_model.source, "baseModel.source", claim_dirs=claim_dirs),
        "dataset": sources.resolve(spec.dataset.source, "dataset.source", claim_dirs=claim_dirs),
        "output": sources.resolve(spec.output.destination, "output.destination", writable=True, claim_dirs=claim_dirs),
    }


def uses_base_model_token(job: FineTuneJob) -> bool:
    spec = job.spec.base_model
    return bool(spec.credentials_secret) and spec.source.partition("://")[0] in CREDENTIAL_SCHEMES


def in_cluster_reporting(job: FineTuneJob, progress_url: str = "") -> dict[str, Any]:
    reporting: dict[str, Any] = {"metricsPort": METRICS_PORT, "metricsHost": f"$({POD_IP_ENV})",
                                 "terminationMessagePath": TERMINATION_LOG}
    if progress_url:
        reporting["progressUrl"] = (f"{progress_url.rstrip('/')}/v1/namespaces/{job.metadata.namespace}"
                                    f"/finetunejobs/{job.metadata.name}/progress")
        reporting["progressTokenFile"] = f"{PROGRESS_TOKEN_DIR}/token"
    return reporting


def uses_hub(job: FineTuneJob) -> bool:
    return job.spec.base_model.source.startswith("hf://")


def render(job: FineTuneJob, *, claim_dirs: dict[str, str] | None = None, reporting: dict[str, Any] | None = None,
           progress_url: str = "", checkpoint_key_sha256: str | None = None, model_cache: bool = False) -> dict[str, Any]:
    """The trainer config as a plain dict (camelCase), validated by the trainer's schema.

    In a pod (the default) URIs resolve to the pod's mount paths; a local run passes
    `claim_dirs` to map each pvc:// claim to a directory, and its own `reporting`.
    `checkpoint_key_sha256`: the digest of the job's checkpoint key (checkpoint_key.py), whose
    Secret the pod mounts; the trainer signs checkpoints with it and refuses another key. None
    (a local run): unsigned checkpoints."""
    spec = job.spec
    resolved = resolved_sources(job, claim_dirs)
    config = JobConfig(
        job_name=job.metadata.name,
        # The owner of the output and its checkpoints: the trainer refuses a destination another
        # job owns and never resumes another job's checkpoints (docs/outputs.md).
        job_uid=job.metadata.uid,
        base_model=BaseModelConfig(
            source=resolved["baseModel"].value,
            revision=spec.base_model.revision,
            token_file=f"{TOKEN_DIR}/{TOKEN_KEY}" if uses_base_model_token(job) else None,
            cache_dir=MODEL_CACHE_DIR if model_cache and uses_hub(job) else None,
            volume_root=resolved["baseModel"].root,
        ),
        dataset=DatasetConfig(path=resolved["dataset"].value, volume_root=resolved["dataset"].root,
                              **options_of(spec.dataset, DatasetOptions)),
        method=spec.method,
        training=spec.training,
        distributed=DistributedConfig(**options_of(spec.distributed, DistributedConfig)),
        output=OutputConfig(dir=resolved["output"].value),
        checkpointing=CheckpointingConfig(
            **options_of(spec.checkpointing, CheckpointingOptions),
            key_file=checkpoint_key.KEY_FILE if checkpoint_key_sha256 else None,
            key_sha256=checkpoint_key_sha256,
        ),
        reporting=ReportingConfig.model_validate(reporting if reporting is not None else in_cluster_reporting(job, progress_url)),
        publish=publish_config(job),
    )
    return config.model_dump(by_alias=True, exclude_none=True, mode="json")
