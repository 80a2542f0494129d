"""What the operator finds in the namespace before it creates a trainer: a ConfigMap or Service of
its children's names that it does not control is not used, and a claim or ConfigMap the pods
would mount must exist first (waiting for one applied in any order, failing after a timeout)."""

from __future__ import annotations

import pytest
from test_operator import condition, job_manifest, wait_phase

from kubetools import wait_for

pytestmark = pytest.mark.usefixtures("claims")


@pytest.fixture
def operator_env() -> dict[str, str]:
    return {"FINETUNE_INPUT_TIMEOUT_SECONDS": "20"}


def test_a_config_map_of_the_trainers_name_that_the_job_does_not_own_is_refused(kubectl, operator):
    # Someone pre-creates the trainer config, hoping the job trains on it.
    kubectl.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "demo-trainer-config"},
                   "data": {"config.yaml": "training: {learningRate: 1000}\n"}})
    kubectl.create(job_manifest())
    ftj = wait_phase(kubectl, "Failed")
    assert condition(ftj, "Failed")["reason"] == "NameConflict"
    assert "ConfigMap named demo-trainer-config" in condition(ftj, "Failed")["message"]
    assert kubectl.get("job", "demo-trainer") is None
    assert "1000" in kubectl.get("configmap", "demo-trainer-config")["data"]["config.yaml"]  # left alone


def test_a_controlled_config_map_with_other_content_is_rewritten(kubectl, operator):
    # The job waits for its claim, so nothing is created yet; meanwhile a ConfigMap of the
    # trainer config's name appears, claiming the job as its controller (stale or forged).
    kubectl.create(job_manifest("first", dataset={"source": "pvc://first-data/train.jsonl"}))
    wait_for(lambda: waiting_for_inputs(kubectl, "first"), 30, what="WaitingForInputs")
    uid = kubectl.get("ftj", "first")["metadata"]["uid"]
    kubectl.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "first-trainer-config", "ownerReferences": [{
            "apiVersion": "finetune.ai/v1alpha1", "kind": "FineTuneJob", "name": "first", "uid": uid, "controller": True}]},
        "data": {"config.yaml": "forged: true\n"}})
    kubectl.apply(claim("first-data"))
    wait_for(lambda: kubectl.get("job", "first-trainer"), 30, what="the trainer Job")
    config = kubectl.get("configmap", "first-trainer-config")["data"]["config.yaml"]
    assert "forged" not in config and "first-data" in config


def waiting_for_inputs(kubectl, name: str) -> bool:
    return any(c.get("reason") == "WaitingForInputs" for c in kubectl.get("ftj", name).get("status", {}).get("conditions", []))


def claim(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}


def test_a_missing_claim_keeps_the_job_pending_until_it_exists(kubectl, operator):
    spec = job_manifest("late", dataset={"source": "pvc://late-data/train.jsonl"})
    kubectl.create(spec)
    wait_for(lambda: waiting_for_inputs(kubectl, "late"), 30, what="WaitingForInputs")
    ftj = kubectl.get("ftj", "late")
    assert "PersistentVolumeClaim late-data" in str(ftj["status"]), ftj["status"]
    assert kubectl.get("job", "late-trainer") is None
    # Applied a moment later (GitOps applies in any order): the job goes on.
    kubectl.apply(claim("late-data"))
    wait_for(lambda: kubectl.get("job", "late-trainer"), 30, what="the trainer Job once the claim exists")


def test_a_claim_still_missing_after_the_timeout_fails_the_job(kubectl, operator):
    kubectl.create(job_manifest("never", dataset={"source": "pvc://never-data/train.jsonl"}))
    ftj = wait_phase(kubectl, "Failed", "never", timeout=60)
    assert condition(ftj, "Failed")["reason"] == "ConfigError"
    assert "PersistentVolumeClaim never-data" in condition(ftj, "Failed")["message"]
    assert kubectl.get("job", "never-trainer") is None


def test_each_job_gets_a_network_policy_for_its_trainers(kubectl, operator):
    # While the job waits for its claim, a NetworkPolicy of its name appears that claims the job
    # as controller and admits everyone: the operator puts back the one it builds.
    kubectl.create(job_manifest("fenced", dataset={"source": "pvc://fenced-data/train.jsonl"}))
    wait_for(lambda: waiting_for_inputs(kubectl, "fenced"), 30, what="WaitingForInputs")
    uid = kubectl.get("ftj", "fenced")["metadata"]["uid"]
    kubectl.apply({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {
        "name": "fenced-trainer", "ownerReferences": [{
            "apiVersion": "finetune.ai/v1alpha1", "kind": "FineTuneJob", "name": "fenced", "uid": uid, "controller": True}]},
        "spec": {"podSelector": {}, "ingress": [{}], "policyTypes": ["Ingress"]}})
    kubectl.apply(claim("fenced-data"))
    wait_for(lambda: kubectl.get("job", "fenced-trainer"), 30, what="the trainer Job")
    policy = kubectl.get("networkpolicy", "fenced-trainer")
    assert [r["uid"] for r in policy["metadata"]["ownerReferences"] if r.get("controller")] == [uid]
    own_pods = {"finetune.ai/job": "fenced", "app.kubernetes.io/component": "trainer"}
    assert policy["spec"]["podSelector"]["matchLabels"] == own_pods
    assert policy["spec"]["ingress"][0] == {"from": [{"podSelector": {"matchLabels": own_pods}}]}
