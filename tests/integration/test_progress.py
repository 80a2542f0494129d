"""Live progress: a trainer pod reports to the operator with its pod-bound token; the progress
reaches the FineTuneJob's status and `kubectl get ftj`; another job's pod is refused."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from test_operator import RESULT, finish_pod, job_manifest, running_pod, wait_phase

from kubetools import wait_for

pytestmark = pytest.mark.usefixtures("claims")


def pod_token(kubectl, pod: dict, audience: str = "finetune.ai/progress") -> str:
    """What the kubelet mounts for the trainer: a token bound to the pod, for our audience."""
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
               "spec": {"audiences": [audience], "expirationSeconds": 600,
                        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod["metadata"]["name"],
                                           "uid": pod["metadata"]["uid"]}}}
    proc = kubectl("create", "--raw", f"/api/v1/namespaces/{kubectl.namespace}/serviceaccounts/"
                   f"{pod['spec'].get('serviceAccountName', 'default')}/token", "-f", "-", input=json.dumps(request))
    return json.loads(proc.stdout)["status"]["token"]


def post_progress(operator, namespace: str, job: str, token: str | None, body: dict) -> int:
    url = f"http://127.0.0.1:{operator.progress_port}/v1/namespaces/{namespace}/finetunejobs/{job}/progress"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_progress_reaches_status_and_printer_columns(kubectl, namespace, operator):
    kubectl.create(job_manifest())
    pod = running_pod(kubectl)
    token = pod_token(kubectl, pod)
    reported = time.monotonic()
    for step in (5, 10, 20):  # a burst: only the latest needs to land
        assert post_progress(operator, namespace, "demo", token,
                             {"step": step, "totalSteps": 40, "loss": 3.0 - step / 10, "tokensPerSecond": 1234.5, "eta": 75}) == 202

    def progress():
        status = kubectl.get("ftj", "demo").get("status", {})
        return status.get("progress") if (status.get("progress") or {}).get("step") == 20 else None

    got = wait_for(progress, 15, what="progress in the status")
    assert time.monotonic() - reported < 15
    assert got["percent"] == 50 and got["totalSteps"] == 40 and got["loss"] == pytest.approx(1.0)
    assert got["eta"] == "1m15s" and got["tokensPerSecond"] == 1234.5 and got["updatedAt"]
    row = kubectl("get", "ftj", "demo", "--no-headers").stdout.split()
    assert row[1:5] == ["Running", "50", "1", "1m15s"]

    finish_pod(kubectl, pod, 0, json.dumps(RESULT))
    wait_phase(kubectl, "Succeeded")


def test_another_jobs_pod_cannot_write_this_jobs_progress(kubectl, namespace, operator):
    kubectl.create(job_manifest("victim"))
    kubectl.create(job_manifest("intruder"))
    victim_pod = running_pod(kubectl, "victim")
    intruder_token = pod_token(kubectl, running_pod(kubectl, "intruder"))
    body = {"step": 99, "totalSteps": 100, "loss": 0.01}
    assert post_progress(operator, namespace, "victim", intruder_token, body) == 403
    assert post_progress(operator, namespace, "victim", None, body) == 401
    assert post_progress(operator, namespace, "victim", "not-a-token", body) == 401
    # The victim's own pod with a token for another audience (the API server's) is refused too.
    assert post_progress(operator, namespace, "victim", pod_token(kubectl, victim_pod, "https://127.0.0.1:6443"), body) == 401
    assert "not one of its trainer pods" in operator.log
    assert post_progress(operator, namespace, "victim", pod_token(kubectl, victim_pod), {"step": -1}) == 400
    time.sleep(3)
    assert "progress" not in kubectl.get("ftj", "victim").get("status", {})
