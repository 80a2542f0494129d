"""The operator against the real control plane: kube-apiserver with the CRDs, the Job controller,
the scheduler, the garbage collector, and kwok playing the nodes. kwok runs no containers, so a
test decides how a trainer pod ends by annotating it (hack/kwok/pod-exit.yaml): exit code,
reason and the termination message where the trainer reports its result."""

from __future__ import annotations

import json
import time

import pytest

from finetune_operator.crashpoints import created, status_written
from kubetools import CrashPoints, OperatorProcess, Supervisor, wait_for

pytestmark = pytest.mark.usefixtures("claims")

SHA_A = "a" * 64
SHA_B = "b" * 64
RESULT = {
    "files": {
        "adapter_model.safetensors": {"sha256": SHA_A, "size": 4096},
        "adapter_config.json": {"sha256": SHA_B, "size": 512},
    },
    "metrics": {"trainLoss": 1.25, "evalLoss": 1.5, "initialEvalLoss": 4.0, "steps": 12, "tokens": 24576},
    "world": {"worldSize": 1, "nodes": 1, "processesPerNode": 1},  # what job_manifest asks for
}


def result_in_world(nodes: int, per_node: int = 1) -> dict:
    """RESULT as a trainer reports it from a process group of nodes x per_node processes."""
    return {**RESULT, "world": {"worldSize": nodes * per_node, "nodes": nodes, "processesPerNode": per_node}}


def job_manifest(name: str = "demo", **spec_overrides) -> dict:
    spec = {
        "baseModel": {"source": "preset://tiny-llama"},
        "dataset": {"source": "pvc://data/train.jsonl"},
        "output": {"destination": f"pvc://models/{name}"},
        "resources": {"accelerator": "none", "cpu": "1", "memory": "1Gi"},
        "training": {"microBatchSize": 1, "globalBatchSize": 4},
    }
    spec.update(spec_overrides)
    return {"apiVersion": "finetune.ai/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}


def running_pod(kubectl, job: str = "demo", timeout: float = 60) -> dict:
    def find():
        pods = kubectl.items("pods", f"finetune.ai/job={job}")
        live = [p for p in pods if p["status"].get("phase") == "Running"]
        return live[0] if live else None

    return wait_for(find, timeout, what=f"a Running trainer pod of {job}")


def finish_pod(kubectl, pod: dict, exit_code: int, message: str = "", reason: str = "") -> None:
    annotations = {"kwok.finetune.ai/exit-code": str(exit_code)}
    if message:
        annotations["kwok.finetune.ai/message"] = message
    if reason:
        annotations["kwok.finetune.ai/reason"] = reason
    kubectl.merge_patch("pod", pod["metadata"]["name"], {"metadata": {"annotations": annotations}})


def wait_phase(kubectl, phase: str, name: str = "demo", timeout: float = 60) -> dict:
    def check():
        ftj = kubectl.get("ftj", name)
        return ftj if ftj and ftj.get("status", {}).get("phase") == phase else None

    try:
        return wait_for(check, timeout, what=f"FineTuneJob {name} to be {phase}")
    except AssertionError:
        ftj = kubectl.get("ftj", name)
        raise AssertionError(f"{name} is not {phase}: status={json.dumps((ftj or {}).get('status'), indent=1)}") from None


def condition(obj: dict, kind: str) -> dict:
    return next(c for c in obj["status"]["conditions"] if c["type"] == kind)


def test_success_publishes_a_model_with_the_reported_digest(kubectl, operator):
    created = kubectl.create(job_manifest())
    config_map = wait_for(lambda: kubectl.get("configmap", "demo-trainer-config"), 30, what="the trainer ConfigMap")
    job = wait_for(lambda: kubectl.get("job", "demo-trainer"), 30, what="the trainer Job")
    for child in (config_map, job):
        owner = child["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["uid"], owner["controller"]) == ("FineTuneJob", created["metadata"]["uid"], True)
    assert "preset://tiny-llama" in config_map["data"]["config.yaml"]

    pod = running_pod(kubectl)
    node = kubectl.get("node", pod["spec"]["nodeName"])
    assert node and not node["spec"].get("taints"), node  # an ordinary node: the job asked for no pool
    ftj = wait_phase(kubectl, "Running")
    assert condition(ftj, "Running")["status"] == "True"

    finish_pod(kubectl, pod, 0, json.dumps(RESULT))
    ftj = wait_phase(kubectl, "Succeeded")
    status = ftj["status"]
    assert status["model"] == "demo"
    assert status["observedGeneration"] == ftj["metadata"]["generation"]
    assert condition(ftj, "Succeeded")["status"] == "True"
    assert condition(ftj, "Ready")["status"] == "True"
    assert condition(ftj, "Failed")["status"] == "False"
    assert status["progress"]["percent"] == 100

    model = wait_for(lambda: kubectl.get("model", "demo"), 10, what="the Model")
    assert model["spec"]["adapter"]["sha256"] == SHA_A
    assert model["spec"]["adapter"]["sizeBytes"] == 4096 + 512
    assert model["spec"]["adapter"]["files"]["adapter_config.json"]["sha256"] == SHA_B
    assert model["spec"]["adapter"]["format"] == "peft"
    assert model["spec"]["sourceJob"] == {"name": "demo", "uid": created["metadata"]["uid"]}
    assert model["spec"]["baseModel"]["source"] == "preset://tiny-llama"
    assert model["status"]["phase"] == "Ready"
    assert model["status"]["metrics"]["evalLoss"] == 1.5

    events = kubectl.items("events")
    reasons = {e["reason"] for e in events if e["involvedObject"]["name"] == "demo"}
    assert {"ModelPublished", "Completed"} <= reasons, reasons


def test_failed_pod_fails_the_job_with_its_reason(kubectl, operator):
    kubectl.create(job_manifest(backoffLimit=0))
    pod = running_pod(kubectl)
    finish_pod(kubectl, pod, 1, "RuntimeError: NCCL communicator was aborted")
    ftj = wait_phase(kubectl, "Failed")
    failed = condition(ftj, "Failed")
    assert failed["status"] == "True"
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "last failure: TrainerError: pod demo-trainer-0-" in failed["message"]
    assert "exit code 1 (Error): RuntimeError: NCCL communicator was aborted" in failed["message"]
    assert kubectl.get("model", "demo") is None


def test_out_of_memory_fails_at_once_with_advice(kubectl, operator):
    kubectl.create(job_manifest(backoffLimit=5))
    finish_pod(kubectl, running_pod(kubectl), 137, "CUDA out of memory. Tried to allocate 2.00 GiB", reason="OOMKilled")
    ftj = wait_phase(kubectl, "Failed")
    failed = condition(ftj, "Failed")
    assert failed["reason"] == "OutOfMemory"
    assert "CUDA out of memory" in failed["message"] and "Lower spec.training.microBatchSize" in failed["message"]
    wait_for(lambda: kubectl.get("job", "demo-trainer") is None, 30, what="the trainer Job to be deleted, not retried")


def test_user_error_exit_code_fails_at_once_without_retries(kubectl, operator):
    kubectl.create(job_manifest(backoffLimit=5))
    pod = running_pod(kubectl)
    finish_pod(kubectl, pod, 2, "dataset.path: /mnt/pvc/data/train.jsonl:7: not valid JSON")
    ftj = wait_phase(kubectl, "Failed")
    failed = condition(ftj, "Failed")
    assert failed["reason"] == "InvalidInput"
    # In the spec's terms: its field and its URI, not the trainer's config path and the pod's mount.
    assert failed["message"].startswith("bad configuration or data, retrying cannot help: pod demo-trainer-")
    assert failed["message"].endswith(": spec.dataset.source: pvc://data/train.jsonl:7: not valid JSON")
    assert "/mnt/pvc" not in failed["message"] and "dataset.path" not in failed["message"]
    assert len(kubectl.items("pods", "finetune.ai/job=demo")) == 1  # no retry


def test_bad_input_under_torchrun_is_the_operators_to_end(kubectl, operator):
    """torchrun exits 1 whatever the trainer exited with, so the Job's pod failure policy cannot see
    the user error: the operator reads it from the termination message and stops the Job."""
    kubectl.create(job_manifest(backoffLimit=5))
    finish_pod(kubectl, running_pod(kubectl), 1, json.dumps({"error": "dataset line 3: not valid JSON", "exitCode": 2}))
    failed = condition(wait_phase(kubectl, "Failed"), "Failed")
    assert failed["reason"] == "InvalidInput" and "line 3: not valid JSON" in failed["message"]
    wait_for(lambda: kubectl.get("job", "demo-trainer") is None, 30, what="the trainer Job to be deleted, not retried")


def test_retryable_failure_is_retried_then_succeeds(kubectl, operator):
    kubectl.create(job_manifest(backoffLimit=2))
    first = running_pod(kubectl)
    finish_pod(kubectl, first, 1, "NCCL timeout")

    def second_pod():
        pods = [p for p in kubectl.items("pods", "finetune.ai/job=demo")
                if p["metadata"]["name"] != first["metadata"]["name"] and p["status"].get("phase") == "Running"]
        return pods[0] if pods else None

    retry = wait_for(second_pod, 60, what="a retried trainer pod")
    ftj = wait_phase(kubectl, "Running")
    assert "after 1 failed attempt" in condition(ftj, "Running")["message"]
    finish_pod(kubectl, retry, 0, json.dumps(RESULT))
    wait_phase(kubectl, "Succeeded")


def test_exit_zero_without_result_is_a_failure(kubectl, operator):
    kubectl.create(job_manifest())
    finish_pod(kubectl, running_pod(kubectl), 0)
    ftj = wait_phase(kubectl, "Failed")
    failed = condition(ftj, "Failed")
    assert failed["reason"] == "NoResult"
    assert "reported no result" in failed["message"]
    assert kubectl.get("model", "demo") is None


def test_invalid_result_is_a_failure(kubectl, operator):
    kubectl.create(job_manifest())
    bad = {"files": {"adapter_model.safetensors": {"sha256": "nope", "size": 1}}, "metrics": RESULT["metrics"]}
    finish_pod(kubectl, running_pod(kubectl), 0, json.dumps(bad))
    ftj = wait_phase(kubectl, "Failed")
    assert condition(ftj, "Failed")["reason"] == "InvalidResult"
    assert "files.adapter_model.safetensors.sha256" in condition(ftj, "Failed")["message"]
    assert kubectl.get("model", "demo") is None


def test_a_source_the_operator_cannot_mount_fails_clearly_and_creates_nothing(kubectl, operator):
    kubectl.create(job_manifest(dataset={"source": "configmap://only-name"}))
    ftj = wait_phase(kubectl, "Failed")
    assert condition(ftj, "Failed")["reason"] == "InvalidSpec"
    assert "dataset.source: configmap:// needs NAME/KEY" in condition(ftj, "Failed")["message"]
    time.sleep(2)
    assert kubectl.items("jobs") == [] and kubectl.items("configmaps", "finetune.ai/job=demo") == []


def test_trainer_pod_settings_reach_the_running_pod(kubectl, operator):
    """spec.trainerPod, through the operator's dry run and create, the Job controller and the
    scheduler, on the pod that runs."""
    kubectl.create(job_manifest(trainerPod={
        "serviceAccountName": "default", "imagePullSecrets": ["regcred"],
        "labels": {"team": "nlp"}, "annotations": {"sidecar.istio.io/inject": "false"},
        "env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "HTTPS_PROXY", "value": "http://proxy:3128"}]}))
    pod = running_pod(kubectl)
    assert pod["spec"]["serviceAccountName"] == "default" and pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["metadata"]["labels"]["team"] == "nlp" and pod["metadata"]["labels"]["finetune.ai/job"] == "demo"
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["NCCL_DEBUG"] == "INFO" and env["HTTPS_PROXY"] == "http://proxy:3128" and env["HOME"] == "/tmp"
    assert pod["spec"]["automountServiceAccountToken"] is False
    # A name the operator sets is refused at apply time, not shadowed or ignored.
    refused = kubectl("create", "-f", "-", input=json.dumps(job_manifest("shadow", trainerPod={
        "env": [{"name": "MASTER_ADDR", "value": "evil"}]})), check=False)
    assert refused.returncode != 0 and "is set by the operator" in refused.stderr, refused.stderr


def test_model_name_taken_by_another_job(kubectl, operator):
    kubectl.create(job_manifest("first", output={"destination": "pvc://models/a", "modelName": "shared"}))
    finish_pod(kubectl, running_pod(kubectl, "first"), 0, json.dumps(RESULT))
    wait_phase(kubectl, "Succeeded", "first")
    kubectl.create(job_manifest("second", output={"destination": "pvc://models/b", "modelName": "shared"}))
    finish_pod(kubectl, running_pod(kubectl, "second"), 0, json.dumps(RESULT))
    ftj = wait_phase(kubectl, "Failed", "second")
    assert condition(ftj, "Failed")["reason"] == "ModelNameConflict"
    assert kubectl.get("model", "shared")["spec"]["sourceJob"]["name"] == "first"


def test_a_hand_made_model_with_the_jobs_uid_is_not_published(kubectl, operator):
    """Someone who may create Models pre-creates the job's Model with its UID and their own
    weights: the operator must not mark it Ready as verified by the trainer."""
    job = kubectl.create(job_manifest())
    forged = {
        "apiVersion": "finetune.ai/v1alpha1", "kind": "Model", "metadata": {"name": "demo"},
        "spec": {"baseModel": {"source": "preset://tiny-llama"},
                 "adapter": {"uri": "pvc://attacker/weights", "format": "peft", "sha256": "f" * 64, "sizeBytes": 1},
                 "method": {"type": "lora"}, "training": {}, "dataset": {"source": "pvc://data/train.jsonl"},
                 "sourceJob": {"name": "demo", "uid": job["metadata"]["uid"]}},
    }
    kubectl.create(forged)
    finish_pod(kubectl, running_pod(kubectl), 0, json.dumps(RESULT))
    ftj = wait_phase(kubectl, "Failed")
    assert condition(ftj, "Failed")["reason"] == "ModelNameConflict"
    model = kubectl.get("model", "demo")
    assert model["spec"]["adapter"]["uri"] == "pvc://attacker/weights" and model.get("status", {}).get("phase") != "Ready"


def test_deleting_the_job_cascades_to_every_child_and_the_model_stays(kubectl, operator):
    created = kubectl.create(job_manifest())
    finish_pod(kubectl, running_pod(kubectl), 0, json.dumps(RESULT))
    wait_phase(kubectl, "Succeeded")
    assert kubectl.get("model", "demo")
    kubectl("delete", "ftj", "demo", "--wait=true", "--timeout=60s")

    def all_gone():
        left = [kubectl.get(kind, name) for kind, name in [("job", "demo-trainer"), ("configmap", "demo-trainer-config")]]
        return all(obj is None for obj in left) and not kubectl.items("pods", "finetune.ai/job=demo")

    wait_for(all_gone, 60, what="the garbage collector to delete the children")
    # The published Model is not a child: it outlives the job (output.deleteModelWithJob unset),
    # Ready, naming the job it came from.
    model = kubectl.get("model", "demo")
    assert model and model["status"]["phase"] == "Ready" and "ownerReferences" not in model["metadata"]
    assert model["spec"]["sourceJob"] == {"name": "demo", "uid": created["metadata"]["uid"]}


def test_crashes_between_writes_never_duplicate_or_lose_children(kubectl, kubeconfig, namespace, tmp_path):
    """SIGKILL the operator between the writes of a lifecycle (crash points, each landing mid-work)
    while restarting it like a crash-looping pod: every job ends with exactly one of each child,
    finishes, and its Model is Ready."""
    crashes = CrashPoints(tmp_path / "crash-points")
    windows = {"job-0": (created("Secret"), created("Model")), "job-1": (created("ConfigMap"), status_written("Succeeded")),
               "job-2": (created("NetworkPolicy"), status_written("Running")), "job-3": (created("Job"), created("Model"))}
    for name, points in windows.items():
        for point in points:
            crashes.arm(point, namespace, name)
    operator = OperatorProcess(kubeconfig, namespace, tmp_path / "operator.log", env=crashes.env).start()
    supervisor = Supervisor(operator)
    supervisor.start()
    try:
        # One job at a time: a kill aimed at one job's window must not land in another's first.
        for name in windows:
            kubectl.create(job_manifest(name))
            wait_phase(kubectl, "Running", name, timeout=90)
        for name in windows:
            finish_pod(kubectl, running_pod(kubectl, name), 0, json.dumps(RESULT))
            wait_phase(kubectl, "Succeeded", name, timeout=90)
        for name in windows:
            for kind in ("jobs", "configmaps", "secrets", "networkpolicies"):
                assert len(kubectl.items(kind, f"finetune.ai/job={name}")) == 1, (name, kind)
            assert kubectl.get("model", name)["status"]["phase"] == "Ready"
        assert crashes.fired == {(point, f"{namespace}.{name}") for name, points in windows.items() for point in points}
        assert supervisor.restarts == 8
    finally:
        supervisor.stop()
        operator.stop()


def test_two_replicas_never_both_act(kubectl, kubeconfig, namespace, operator, tmp_path):
    standby = OperatorProcess(kubeconfig, namespace, tmp_path / "standby.log", identity="standby").start()
    try:
        time.sleep(3)
        assert "became leader" not in standby.log
        kubectl.create(job_manifest())
        running_pod(kubectl)
        assert "created trainer Job" in operator.log and "created trainer Job" not in standby.log
        operator.stop()  # a clean stop hands the Lease over at once
        standby.wait_leading(timeout=30)
        lease = kubectl.get("lease", "finetune-operator")
        assert lease["spec"]["holderIdentity"].startswith("standby")
        finish_pod(kubectl, running_pod(kubectl), 0, json.dumps(RESULT))
        wait_phase(kubectl, "Succeeded")
    finally:
        standby.stop()
