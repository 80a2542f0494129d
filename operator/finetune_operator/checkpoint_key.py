"""Each FineTuneJob's checkpoint key: a Secret the operator creates and the trainer signs with.

The trainer resumes only checkpoints whose manifest is HMAC-signed with this key
(finetune_trainer.checkpoint_integrity), so a writer of the output claim cannot plant a pickle
that the trainer would unpickle. The key is 32 random bytes, made by the operator for each job
and kept in the Secret `<job>-checkpoint-key`, which the job controls (the garbage collector
removes it with the job). Only the trainer pods mount it (its one key, read-only, mode 0400).

The operator may create and delete Secrets but not read them (least privilege), so on
"already exists" it cannot tell whose Secret that is nor what key it holds: someone who can
create Secrets may have made it with a key they know, to forge checkpoints. And a Secret of its
own is found the same way after a restart between creating the Secret and the trainer Job. Both
are handled alike: this runs only while the trainer Job does not exist (nothing has used a key
yet), so the Secret is deleted and a fresh one created, and the trainer ConfigMap (which the
job controls and the operator rewrites when its content differs) is written afterwards with the
SHA-256 of the new key. The trainer refuses a key file whose digest differs from the
ConfigMap's, so a Secret replaced later (after the Job exists) fails the trainer with a
ConfigError instead of being trusted. See docs/outputs.md.
"""

from __future__ import annotations

import base64
import hashlib
import secrets

from . import naming
from .api import FineTuneJob

KEY_BYTES = 32
SECRET_KEY = "key"  # the one key of the Secret, and the file the trainer reads
KEY_DIR = "/var/run/secrets/finetune/checkpoint-key"
KEY_FILE = f"{KEY_DIR}/{SECRET_KEY}"
VOLUME = "checkpoint-key"


def secret_name(job: FineTuneJob) -> str:
    return f"{job.metadata.name}-checkpoint-key"


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def key_sha256(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()


def build_secret(job: FineTuneJob, key: bytes) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret_name(job),
            "namespace": job.metadata.namespace,
            "labels": naming.labels(job),
            "ownerReferences": [naming.owner_reference(job)],
        },
        "type": "Opaque",
        # Never edited in place: a key is replaced only by deleting the Secret and creating another.
        "immutable": True,
        "data": {SECRET_KEY: base64.b64encode(key).decode()},
    }


def volume(job: FineTuneJob) -> dict:
    return {"name": VOLUME, "secret": {"secretName": secret_name(job), "defaultMode": 0o400,
                                       "items": [{"key": SECRET_KEY, "path": SECRET_KEY}]}}


def volume_mount() -> dict:
    return {"name": VOLUME, "mountPath": KEY_DIR, "readOnly": True}
