"""Atomic, resumable checkpoints.

Layout under the checkpoint dir:
  step-00000200/            a complete checkpoint (only complete ones ever carry this name)
    state/                  DeepSpeed's files: trainable weights, optimizer, LR scheduler
    rng-rank<N>.pt          each process's random state (LoRA dropout continues identically)
    trainer_state.json      step, tokens seen, losses so far, config fingerprint
    checkpoint-manifest.json  every other file's SHA-256, HMAC-signed with the job's key
  .tmp-step-00000400/       being written; ignored and cleared on start

Every process writes its own shard into the temporary dir; after a barrier rank 0 writes
trainer_state.json, then the signed manifest over every file (checkpoint_integrity), fsyncs and
renames the dir. Nothing of a checkpoint is unpickled before its manifest is verified. A crash at any point leaves either the old
checkpoints or the new complete one, never a half-written "latest". Frozen base weights
are not saved (exclude_frozen_parameters): they are reloaded from the base model.
The checkpoint dir must be shared by all processes (one volume for all nodes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from finetune_trainer import checkpoint_integrity as integrity
from finetune_trainer import distributed
from finetune_trainer.config import JobConfig
from finetune_trainer.errors import ConfigError

log = logging.getLogger(__name__)

DEEPSPEED_TAG = "state"
STATE_FILE = "trainer_state.json"


def config_fingerprint(config: JobConfig, world_size: int, dataset_sha256: str) -> str:
    """What must not change between a checkpoint and the run resuming from it: the job itself
    (its name and UID: a checkpoint is resumed only by the job that wrote it, never by another
    job, nor by a re-created job of the same name), the training config, the data (its digest,
    not only its path) and the process count."""
    relevant = config.model_dump(
        mode="json", include={"job_name", "job_uid", "base_model", "dataset", "method", "training", "distributed"}
    )
    relevant["datasetSha256"] = dataset_sha256
    relevant["worldSize"] = world_size  # ZeRO partitions are per process
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def clear_incomplete(root: Path, is_main: bool) -> None:
    if is_main and root.is_dir():
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    distributed.barrier()


def save(engine, root: Path, step: int, state: dict[str, Any], keep: int, dist, key: bytes | None = None) -> Path:
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)
    torch.save(torch.get_rng_state(), tmp / f"rng-rank{dist.rank}.pt")
    if dist.device.type == "cuda":
        torch.save(torch.cuda.get_rng_state(), tmp / f"cuda-rng-rank{dist.rank}.pt")
    distributed.barrier()
    if dist.is_main:
        state_path = tmp / STATE_FILE
        with open(state_path, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        # Last, over every file (the barrier above waited for every rank's shard; the dir is
        # shared by all processes): what a resume verifies before unpickling anything.
        integrity.write_manifest(tmp, key)
        _fsync_dir(tmp)
        if final.exists():  # a leftover from a run that crashed after renaming
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def _trusted(checkpoint: Path, key: bytes | None, dist) -> bool:
    """Whether every process found `checkpoint` signed with the job's key and unchanged. All
    processes decide together, so none loads a checkpoint another one refused."""
    if key is None:
        return True
    try:
        integrity.verify(checkpoint, key)
        refused = 0.0
    except integrity.Untrusted as exc:
        log.warning("not resuming from checkpoint %s: %s; it is not loaded (nothing in it is unpickled)",
                    checkpoint, exc)
        refused = 1.0
    except OSError as exc:
        log.warning("not resuming from checkpoint %s: cannot read it: %s", checkpoint, exc)
        refused = 1.0
    return distributed.all_reduce_sum([refused], dist.device)[0] == 0


def load_latest(engine, root: Path, fingerprint: str, dist, key: bytes | None = None) -> dict[str, Any] | None:
    """Restore the newest complete checkpoint this job signed into the engine; its trainer
    state, or None (start from scratch).

    With a key, a checkpoint whose manifest is missing, unsigned, wrongly signed or does not
    list exactly the files on disk is skipped with a warning, and the next older one is tried.
    Without a key (local runs) the newest is loaded unverified, as the log says."""
    checkpoints = complete_checkpoints(root)
    if not checkpoints:
        return None
    if key is None:
        log.warning("checkpoints in %s are not verified: no checkpointing.keyFile is configured (a local run); "
                    "resuming trusts whoever can write that directory", root)
    latest = next((c for c in reversed(checkpoints) if _trusted(c, key, dist)), None)
    if latest is None:
        log.warning("no checkpoint in %s is signed with this job's key; starting from scratch", root)
        return None
    state = json.loads((latest / STATE_FILE).read_text())
    if state.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"checkpointing.dir: {root} holds checkpoints of a different job config, dataset or process "
            "count, or of another job (a job resumes only its own checkpoints); remove them or point "
            "checkpointing.dir elsewhere"
        )
    # Frozen base weights are not in the checkpoint, so the module load is non-strict.
    load_path, _ = engine.load_checkpoint(str(latest), tag=DEEPSPEED_TAG, load_module_strict=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {latest}")
    torch.set_rng_state(torch.load(latest / f"rng-rank{dist.rank}.pt"))
    cuda_rng = latest / f"cuda-rng-rank{dist.rank}.pt"
    if dist.device.type == "cuda" and cuda_rng.is_file():
        torch.cuda.set_rng_state(torch.load(cuda_rng))
    log.info("resumed from %s (step %d)%s", latest, state["step"], "" if key is None else ", its signature verified")
    return state
