"""The trainer image on the cluster's real node (the upstream kubelet, containerd, runc), driven
by the real operator: what only a real kubelet and kernel do, the cgroup memory limit's OOM kill,
an image the node does not have, SIGTERM with a grace period, reaches the FineTuneJob's status.

The operator runs as a local process here (the chart's own install is test_chart.py); its trainer
pods share the node's network, so they reach its progress endpoint on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from kubetools import REPO, Kubectl, OperatorProcess, wait_for

from conftest import TRAINER_IMAGE, volume_dirs

pytestmark = pytest.mark.integration
ON_THE_NODE = {"FINETUNE_TRAINER_IMAGE": TRAINER_IMAGE, "FINETUNE_TRAINER_IMAGE_PULL_POLICY": "Never",
               "FINETUNE_TRAINER_HOST_NETWORK": "true"}


@pytest.fixture
def operator_env() -> dict[str, str]:
    return ON_THE_NODE


def quickstart(name: str, local_node, **spec) -> dict:
    job = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    job["metadata"]["name"] = name
    job["spec"]["nodePool"] = {"provisioner": "existing", **local_node.placement}
    job["spec"]["output"]["destination"] = f"pvc://models/{name}"
    for section, fields in spec.items():
        job["spec"][section] = {**job["spec"].get(section, {}), **fields}
    return job


def with_data(kubectl: Kubectl, namespace: str) -> Path:
    data, models = volume_dirs(kubectl.kubeconfig, namespace)
    shutil.copy(REPO / "examples" / "data" / "quickstart.jsonl", data)
    return models


def phase(kubectl: Kubectl, name: str, *phases: str, timeout: float = 300) -> dict:
    return wait_for(lambda: (f := kubectl.get("ftj", name)) and f.get("status", {}).get("phase") in phases and f,
                    timeout, interval=1, what=f"{name} to reach {' or '.join(phases)}")


def failed_condition(ftj: dict) -> dict:
    return next(c for c in ftj["status"]["conditions"] if c["type"] == "Failed")


def trainer_pods(kubectl: Kubectl, name: str) -> list[dict]:
    return kubectl.items("pods", f"finetune.ai/job={name}")


def test_over_its_memory_limit_the_kernel_kills_the_trainer_and_the_job_fails_out_of_memory(
        kubectl, namespace, claims, local_node, operator) -> None:
    with_data(kubectl, namespace)
    # llama-1b's fp32 weights alone are 5 GB; the container's cgroup allows 1 GiB.
    kubectl.apply(quickstart("oom", local_node, baseModel={"source": "preset://llama-1b"},
                             resources={"accelerator": "none", "cpu": "1", "memory": "1Gi"}))
    ftj = phase(kubectl, "oom", "Failed", "Succeeded")
    assert ftj["status"]["phase"] == "Failed", json.dumps(ftj["status"], indent=1)
    failed = failed_condition(ftj)
    assert failed["reason"] == "OutOfMemory", failed
    # The kernel's kill, as the kubelet reported it: SIGKILL (137) with the OOMKilled reason
    # (the operator ends a job that cannot succeed at once, its trainer Job and pod with it).
    assert "exit code 137 (OOMKilled)" in failed["message"], failed
    assert "request more memory" in failed["message"], failed


def test_an_image_the_node_does_not_have_fails_the_job_with_image_pull_failed(
        kubectl, namespace, claims, local_node, tmp_path) -> None:
    op = OperatorProcess(kubectl.kubeconfig, namespace, tmp_path / "operator.log",
                         env={**ON_THE_NODE, "FINETUNE_TRAINER_IMAGE": "finetune-trainer:no-such-tag"}).start()
    try:
        op.wait_leading()
        with_data(kubectl, namespace)
        kubectl.apply(quickstart("noimage", local_node))
        ftj = phase(kubectl, "noimage", "Failed", "Succeeded", timeout=120)
        failed = failed_condition(ftj)
        assert failed["reason"] == "ImagePullFailed", failed
        assert "ErrImageNeverPull" in failed["message"] and "finetune-trainer:no-such-tag" in failed["message"], failed
    finally:
        op.stop()


def test_suspend_sends_sigterm_the_trainer_checkpoints_and_resuming_continues_from_it(
        kubectl, namespace, claims, local_node, operator) -> None:
    """SIGTERM -> checkpoint -> exit within the grace period -> a new pod resumes at that step and
    finishes the run: the whole preemption path, through the real kubelet and the operator."""
    models = with_data(kubectl, namespace)
    # Long enough to be suspended mid-run, short enough to finish after resuming. A step takes
    # 0.1-0.4 s here, and the step the test sees lags the trainer's by the push interval (2 s)
    # plus the status write and the suspend's way to the kubelet: at 24 steps, CI once saw the
    # run end before its SIGTERM came. No periodic checkpoint comes before the end.
    total = 200
    kubectl.apply(quickstart("pause", local_node, training={"epochs": 100, "maxSteps": total},
                             checkpointing={"everySteps": 1_000_000, "keep": 1}))
    progress = wait_for(lambda: (p := kubectl.get("ftj", "pause").get("status", {}).get("progress") or {})
                        and p.get("step", 0) >= 3 and p, 300, interval=1, what="the trainer to make progress")
    # Mid-run: only the trainer's own pushes say this (the operator writes 100% from the result).
    assert 3 <= progress["step"] < progress["totalSteps"], progress
    [pod] = trainer_pods(kubectl, "pause")
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    kubectl.merge_patch("ftj", "pause", {"spec": {"suspend": True}})
    phase(kubectl, "pause", "Suspended", timeout=60)
    # The Job controller deletes the pod; the kubelet sends SIGTERM and waits up to the grace
    # period. The pod is gone before the grace period ran out, so the trainer left by itself.
    wait_for(lambda: not trainer_pods(kubectl, "pause"), grace - 10, interval=1,
             what="the suspended trainer pod to exit before its grace period ends")
    checkpoints = sorted((models / "pause" / "checkpoints").glob("step-*"))
    assert checkpoints, f"no checkpoint in {models / 'pause'}: {list((models / 'pause').rglob('*'))}"
    saved = int(checkpoints[-1].name.removeprefix("step-"))
    assert 3 <= saved < total, saved

    kubectl.merge_patch("ftj", "pause", {"spec": {"suspend": False}})
    ftj = phase(kubectl, "pause", "Succeeded", "Failed", timeout=300)
    assert ftj["status"]["phase"] == "Succeeded", json.dumps(ftj["status"], indent=1)
    [resumed] = trainer_pods(kubectl, "pause")
    log = kubectl("logs", resumed["metadata"]["name"], "-c", "trainer").stdout
    assert f"(step {saved})" in log and "resumed from" in log, log[-3000:]
    model = kubectl.get("model", ftj["status"]["model"])
    assert model["status"]["metrics"]["steps"] == total, model["status"]


def test_bad_data_from_the_real_trainer_fails_the_job_once_with_its_file_and_line(
        kubectl, namespace, claims, local_node, operator) -> None:
    """The trainer's own exit code and termination message, through the kubelet, decide the
    outcome: exit 2 with `FILE:LINE: reason` is InvalidInput, and the Job is not retried."""
    data, _ = volume_dirs(kubectl.kubeconfig, namespace)
    good = (REPO / "examples" / "data" / "quickstart.jsonl").read_text().splitlines()
    (data / "quickstart.jsonl").write_text("\n".join(good[:2] + ["{not json"] + good[2:]) + "\n")
    job = quickstart("baddata", local_node)
    job["spec"]["backoffLimit"] = 3
    kubectl.apply(job)
    ftj = phase(kubectl, "baddata", "Failed", "Succeeded", timeout=240)
    failed = failed_condition(ftj)
    assert failed["reason"] == "InvalidInput", failed
    assert "quickstart.jsonl:3:" in failed["message"], failed
    # One attempt: the pod failure policy ended the Job at exit 2; backoffLimit 3 was not spent.
    trainer = kubectl.get("job", "baddata-trainer")
    assert trainer["status"].get("failed") == 1, trainer["status"]
    assert any(c["type"] == "Failed" and c["reason"] == "PodFailurePolicy" for c in trainer["status"]["conditions"]), trainer["status"]
