"""The job's checkpoint key: a Secret the job controls, created (never read) before the ConfigMap
that names its digest and the Job that mounts only it; one found before the Job exists is
replaced, never trusted."""

from __future__ import annotations

import base64
import hashlib

import pytest
import yaml
from factories import make_job

from finetune_operator import checkpoint_key, children, kube, reconcile
from finetune_operator.settings import OperatorSettings

SETTINGS = OperatorSettings(trainer_image="registry.local/trainer:1", default_provisioner="none")


def test_the_secret_is_a_random_key_the_job_controls():
    job = make_job()
    key = checkpoint_key.new_key()
    assert len(key) == 32 and key != checkpoint_key.new_key()
    secret = checkpoint_key.build_secret(job, key)
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "demo-checkpoint-key"
    assert secret["metadata"]["ownerReferences"] == [{"apiVersion": "finetune.ai/v1alpha1", "kind": "FineTuneJob",
                                                      "name": "demo", "uid": "uid-1", "controller": True,
                                                      "blockOwnerDeletion": True}]
    assert secret["immutable"] is True
    assert base64.b64decode(secret["data"]["key"]) == key


def test_the_config_names_the_key_file_and_its_digest_not_the_key():
    key = checkpoint_key.new_key()
    cm = children.build_config_map(make_job(), SETTINGS, checkpoint_key.key_sha256(key))
    text = cm["data"]["config.yaml"]
    config = yaml.safe_load(text)
    assert config["checkpointing"]["keyFile"] == "/var/run/secrets/finetune/checkpoint-key/key"
    assert config["checkpointing"]["keySha256"] == hashlib.sha256(key).hexdigest()
    assert key.hex() not in text and base64.b64encode(key).decode() not in text
    # Without a key (a local run) the trainer writes unsigned checkpoints.
    plain = yaml.safe_load(children.build_config_map(make_job(), SETTINGS)["data"]["config.yaml"])
    assert "keyFile" not in plain["checkpointing"] and "keySha256" not in plain["checkpointing"]


def test_the_pod_mounts_only_the_key_read_only():
    pod = children.build_job(make_job(), SETTINGS)["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "demo-checkpoint-key")
    assert volume["secret"]["items"] == [{"key": "key", "path": "key"}]
    assert volume["secret"]["defaultMode"] == 0o400
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    assert mount == {"name": volume["name"], "mountPath": "/var/run/secrets/finetune/checkpoint-key", "readOnly": True}


class FakeKube:
    def __init__(self, monkeypatch, existing_secret: bool = False, undeletable: bool = False):
        self.calls: list[tuple[str, str]] = []
        self.secret = {"data": {"key": "a2V5"}} if existing_secret else None
        self.undeletable = undeletable
        self.objects: dict[str, dict] = {}
        monkeypatch.setattr(kube, "create_new", self.create_new)
        monkeypatch.setattr(kube, "create", self.create)
        monkeypatch.setattr(kube, "delete", self.delete)
        monkeypatch.setattr(kube, "dry_run", self.dry_run)
        monkeypatch.setattr(kube, "exists", self.exists)
        monkeypatch.setattr(kube, "get", self.get)

    async def create_new(self, obj):
        self.calls.append(("create", obj["kind"]))
        if self.secret is not None:
            return False
        self.secret = obj
        return True

    async def create(self, obj):
        self.calls.append(("create", obj["kind"]))
        self.objects[obj["kind"]] = obj
        return obj, True

    async def delete(self, kind, namespace, name, propagation="Background"):
        self.calls.append(("delete", kind))
        if not self.undeletable:
            self.secret = None
        return True

    async def dry_run(self, obj):
        pass

    async def exists(self, kind, namespace, name):
        return True

    async def get(self, kind, namespace, name):
        return None


def key_of(secret):
    return base64.b64decode(secret["data"]["key"])


async def test_secret_then_config_map_then_job_and_the_digest_matches(monkeypatch):
    api = FakeKube(monkeypatch)
    await reconcile._ensure_children(make_job(), SETTINGS)
    assert [c for c in api.calls if c[0] == "create"] == [("create", "Secret"), ("create", "ConfigMap"),
                                                           ("create", "NetworkPolicy"), ("create", "Job")]
    config = yaml.safe_load(api.objects["ConfigMap"]["data"]["config.yaml"])
    assert config["checkpointing"]["keySha256"] == hashlib.sha256(key_of(api.secret)).hexdigest()


async def test_an_existing_secret_is_replaced_never_trusted(monkeypatch):
    """Someone's (a key they may know), or this operator's from a pass that stopped before the
    Job: the operator cannot read it, so it deletes it and creates a fresh key, whose digest the
    ConfigMap then carries."""
    api = FakeKube(monkeypatch, existing_secret=True)
    await reconcile._ensure_children(make_job(), SETTINGS)
    assert api.calls[:3] == [("create", "Secret"), ("delete", "Secret"), ("create", "Secret")]
    assert key_of(api.secret) != b"key"
    config = yaml.safe_load(api.objects["ConfigMap"]["data"]["config.yaml"])
    assert config["checkpointing"]["keySha256"] == hashlib.sha256(key_of(api.secret)).hexdigest()


async def test_a_secret_that_cannot_be_replaced_is_a_name_conflict(monkeypatch):
    api = FakeKube(monkeypatch, existing_secret=True, undeletable=True)
    with pytest.raises(reconcile.NameTaken, match="a Secret named demo-checkpoint-key exists"):
        await reconcile._ensure_children(make_job(), SETTINGS)
    assert "ConfigMap" not in api.objects and "Job" not in api.objects
