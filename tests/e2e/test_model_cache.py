"""hf:// base models through the namespace's model cache claim, on the real node: two jobs of one
repository and revision read the one copy laid out in the hub's cache format, with no hub to
reach (HF_ENDPOINT points at a closed loopback port, so a download would fail)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hub_layout import save_as_hub_cache

from kubetools import Kubectl, wait_for

from conftest import TRAINER_UID
from test_local_node import ON_THE_NODE, phase, quickstart, trainer_pods, with_data

pytestmark = pytest.mark.integration
CACHE_CLAIM = "hub-cache"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture
def operator_env() -> dict[str, str]:
    # A missing claim fails a job after the input timeout: short here.
    return {**ON_THE_NODE, "FINETUNE_MODEL_CACHE_CLAIM": CACHE_CLAIM, "FINETUNE_INPUT_TIMEOUT_SECONDS": "10"}


@pytest.fixture
def hub_cache(kubeconfig: str, namespace: str, kubectl: Kubectl):
    """A claim whose volume holds acme/tiny at COMMIT (refs/main), as huggingface_hub lays it out."""
    cluster = Kubectl(kubeconfig)
    pv = f"{namespace}-{CACHE_CLAIM}"
    root = f"/tmp/finetune-test-pv/{pv}"
    cluster.apply({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "",
                 "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": root},
                 "claimRef": {"namespace": namespace, "name": CACHE_CLAIM}},
    })
    kubectl.apply({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": CACHE_CLAIM},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": pv,
                 "resources": {"requests": {"storage": "1Gi"}}},
    })
    snapshot = save_as_hub_cache(Path(root), "acme/tiny", COMMIT)
    for directory, _, files in os.walk(root):  # the trainer's user may write (locks, a new revision)
        os.chown(directory, TRAINER_UID, TRAINER_UID)
        for name in files:
            os.chown(os.path.join(directory, name), TRAINER_UID, TRAINER_UID)
    wait_for(lambda: kubectl.get("pvc", CACHE_CLAIM)["status"].get("phase") == "Bound", 60, what="the cache claim to bind")
    yield snapshot
    cluster("delete", "pv", pv, "--wait=false", check=False)


def test_jobs_of_one_hub_model_read_the_namespaces_cache_claim(kubectl, namespace, claims, hub_cache, local_node,
                                                               operator) -> None:
    with_data(kubectl, namespace)
    no_hub = {"env": [{"name": "HF_ENDPOINT", "value": "http://127.0.0.1:9"}]}
    for name in ("hub-a", "hub-b"):
        job = quickstart(name, local_node, training={"maxSteps": 4})
        job["spec"]["baseModel"] = {"source": "hf://acme/tiny", "revision": "main"}
        job["spec"]["trainerPod"] = no_hub
        kubectl.apply(job)
    for name in ("hub-a", "hub-b"):
        ftj = phase(kubectl, name, "Succeeded", "Failed", timeout=300)
        assert ftj["status"]["phase"] == "Succeeded", json.dumps(ftj["status"], indent=1)
        [pod] = trainer_pods(kubectl, name)
        mount = next(m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == "model-cache")
        volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "model-cache")
        assert volume["persistentVolumeClaim"]["claimName"] == CACHE_CLAIM and mount["mountPath"] == "/mnt/model-cache"
        model = kubectl.get("model", name)
        assert model["spec"]["baseModel"] == {"source": "hf://acme/tiny", "revision": "main"}
    # One copy, the one laid out here: nothing was downloaded next to it.
    repos = sorted(p.name for p in hub_cache.parents[2].iterdir() if p.name.startswith("models--"))
    assert repos == ["models--acme--tiny"]
    assert [p.name for p in (hub_cache.parent).iterdir()] == [COMMIT]


def test_a_missing_cache_claim_fails_the_job_before_it_holds_nodes(kubectl, claims, local_node, operator) -> None:
    """Checked like any input the pods mount (reconcile._check_inputs): no trainer Job is created."""
    job = quickstart("nocache", local_node)
    job["spec"]["baseModel"] = {"source": "hf://acme/tiny"}
    kubectl.apply(job)
    ftj = phase(kubectl, "nocache", "Failed", timeout=90)
    failed = next(c for c in ftj["status"]["conditions"] if c["type"] == "Failed")
    assert f"PersistentVolumeClaim {CACHE_CLAIM}" in failed["message"], failed
    assert kubectl.get("job", "nocache-trainer") is None
