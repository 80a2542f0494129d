"""The job's checkpoint key against the real API server: a Secret the job controls, whose digest
(not the key) the trainer ConfigMap names, mounted (only its key) by the trainer Job; a Secret
of that name made beforehand, with a key its maker knows, is replaced, never used."""

from __future__ import annotations

import base64
import hashlib
import secrets

import pytest
import yaml
from test_operator import job_manifest

from kubetools import wait_for

pytestmark = pytest.mark.usefixtures("claims")


def key_of(kubectl, name="demo"):
    secret = kubectl.get("secret", f"{name}-checkpoint-key")
    return secret, base64.b64decode(secret["data"]["key"])


def config_of(kubectl, name="demo"):
    return kubectl.get("configmap", f"{name}-trainer-config")["data"]["config.yaml"]


def test_the_key_secret_is_the_jobs_and_only_its_digest_is_in_the_config(kubectl, operator):
    created = kubectl.create(job_manifest())
    job = wait_for(lambda: kubectl.get("job", "demo-trainer"), 30, what="the trainer Job")
    secret, key = key_of(kubectl)
    assert len(key) == 32 and secret.get("immutable") is True
    assert [(r["uid"], r.get("controller")) for r in secret["metadata"]["ownerReferences"]] == [(created["metadata"]["uid"], True)]
    text = config_of(kubectl)
    config = yaml.safe_load(text)
    assert config["checkpointing"]["keySha256"] == hashlib.sha256(key).hexdigest()
    assert config["checkpointing"]["keyFile"] == "/var/run/secrets/finetune/checkpoint-key/key"
    assert secret["data"]["key"] not in text and key.hex() not in text
    pod = job["spec"]["template"]["spec"]
    volumes = [v for v in pod["volumes"] if "secret" in v]
    assert volumes == [{"name": "checkpoint-key", "secret": {"secretName": "demo-checkpoint-key", "defaultMode": 0o400,
                                                              "items": [{"key": "key", "path": "key"}]}}]
    mounts = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "checkpoint-key"]
    assert mounts == [{"name": "checkpoint-key", "mountPath": "/var/run/secrets/finetune/checkpoint-key", "readOnly": True}]


def test_a_secret_made_beforehand_is_replaced_not_trusted(kubectl, operator):
    known = secrets.token_bytes(32)
    kubectl.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "demo-checkpoint-key"},
                   "data": {"key": base64.b64encode(known).decode()}})
    created = kubectl.create(job_manifest())
    wait_for(lambda: kubectl.get("job", "demo-trainer"), 30, what="the trainer Job")
    secret, key = key_of(kubectl)
    assert key != known
    assert secret["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    assert yaml.safe_load(config_of(kubectl))["checkpointing"]["keySha256"] == hashlib.sha256(key).hexdigest()
