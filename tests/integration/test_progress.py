"""Live progress: a trainer pod reports to the operator with its pod-bound token; the progress
reaches the FineTuneJob's status and `kubectl get ftj`; another job's pod is refused."""

from __future__ import annotations

import http.client
import json
import resource
import socket
import time
import urllib.error
import urllib.request

import pytest
from test_operator import RESULT, finish_pod, job_manifest, running_pod, wait_phase

from kubetools import OperatorProcess, wait_for

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


@pytest.fixture
def small_operator(kubeconfig, namespace, tmp_path, request):
    """The operator with 1,024 open files, as a container runtime's usual default gives it, and a
    short header timeout."""
    op = OperatorProcess(kubeconfig, namespace, tmp_path / "operator.log", max_open_files=1024,
                         env={"FINETUNE_PROGRESS_HEADER_TIMEOUT_SECONDS": "3"}).start()
    op.wait_leading()
    yield op
    op.stop()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print(f"\n----- operator log ({op.log_path}) -----\n{op.log[-8000:]}")


def token_reviews_served(kubectl) -> float:
    """TokenReviews the API server has answered, from its own metrics."""
    total = 0.0
    for line in kubectl("get", "--raw", "/metrics").stdout.splitlines():
        if line.startswith("apiserver_request_total{") and 'resource="tokenreviews"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def half_open(port: int, source: str) -> socket.socket:
    """A connection that starts a request and never finishes its head (slowloris)."""
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    s.sendall(b"POST /v1/namespaces/x/finetunejobs/y/progress HTTP/1.1\r\nHost: operator\r\n")
    return s


def post_or_refused(operator, namespace: str, job: str, token: str, body: dict) -> int:
    """post_progress, or 0 when the server closed the connection (over its connection cap)."""
    try:
        return post_progress(operator, namespace, job, token, body)
    except (ConnectionError, urllib.error.URLError, http.client.HTTPException):
        return 0


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_a_flood_of_connections_and_bogus_tokens_starves_nothing(kubectl, namespace, small_operator):
    """~1,100 half-open connections used to exhaust the operator's file descriptors: health and
    metrics stopped answering, the Lease was lost and the operator exited. Now the flood meets
    connection caps in a process of its own, and bogus tokens a bounded TokenReview rate."""
    op = small_operator
    kubectl.create(job_manifest())
    pod = running_pod(kubectl)
    token = pod_token(kubectl, pod)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    # 1,500 connections from 50 addresses: each address under the per-client cap (32), all of
    # them far over the total cap (512) and the operator's 1,024 file descriptors.
    flood = [half_open(op.progress_port, f"127.0.1.{1 + i % 50}") for i in range(1500)]
    try:
        reviews_before = token_reviews_served(kubectl)
        started = time.monotonic()
        bogus = [post_or_refused(op, namespace, "demo", f"bogus-{i}", {"step": 1, "totalSteps": 2}) for i in range(200)]
        elapsed = time.monotonic() - started
        # Refused (0: closed on accept, while the flood fills the cap), throttled, or unauthorized.
        assert set(bogus) <= {0, 401, 429} and bogus.count(429) + bogus.count(0) > 100, bogus
        # Default 20 reviews a second with a burst of 40; a few more for the pod token below.
        assert token_reviews_served(kubectl) - reviews_before <= 40 + 20 * elapsed + 5

        # Under the flood: health and metrics answer, a trainer's report lands, the operator
        # still leads and still reconciles.
        assert answers(f"http://127.0.0.1:{op.health_port}/healthz")
        assert answers(f"http://127.0.0.1:{op.metrics_port}/metrics")
        # The flood holds the connection cap until the header timeout frees it; a trainer retries
        # with its next report (every 2 s), as this does.
        wait_for(lambda: post_or_refused(op, namespace, "demo", token, {"step": 7, "totalSteps": 10}) == 202, 20,
                 interval=1, what="a trainer's report to be accepted under the flood")
        wait_for(lambda: (kubectl.get("ftj", "demo").get("status", {}).get("progress") or {}).get("step") == 7,
                 20, what="progress under the flood")
        kubectl.create(job_manifest("second"))
        wait_for(lambda: kubectl.get("job", "second-trainer"), 30, what="the second job's trainer Job")

        # The half-open connections are dropped once the header timeout (3 s here) passes.
        time.sleep(4)
        still_open = 0
        for s in flood:
            s.setblocking(False)
            try:
                still_open += s.recv(1) != b""
            except BlockingIOError:
                still_open += 1
            except ConnectionResetError:
                pass
        assert still_open == 0
    finally:
        for s in flood:
            s.close()
    assert op.proc.poll() is None, "the operator exited"
    assert "could not renew the Lease" not in op.log and "taken over" not in op.log
    assert len(op.log) < 200_000, f"the flood wrote {len(op.log)} bytes of operator log"


def trainer_pod(kubectl, job: str) -> dict:
    """The trainer pod the Job controller made (it need not run: a token binds to any pod)."""
    return wait_for(lambda: (kubectl.items("pods", f"finetune.ai/job={job}") or [None])[0], 60, what=f"a pod of {job}")


def test_each_authorization_condition_refuses_on_its_own(kubectl, namespace, operator, kubeconfig):
    """Every check of pod_belongs_to_job, failed alone: a label-only or owner-only check would
    let these through."""
    kubectl.create(job_manifest("victim"))
    kubectl.create(job_manifest("other"))
    victim_pod = trainer_pod(kubectl, "victim")
    body = {"step": 9, "totalSteps": 10}
    # A bare pod with the victim's label, controlled by nothing.
    bare = kubectl.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "bare", "labels": {"finetune.ai/job": "victim"}},
        "spec": {"containers": [{"name": "c", "image": "finetune-trainer:test"}]}})
    assert post_progress(operator, namespace, "victim", pod_token(kubectl, bare), body) == 403
    # A pod of another job's trainer Job, relabelled as the victim's.
    other_pod = trainer_pod(kubectl, "other")
    kubectl.merge_patch("pod", other_pod["metadata"]["name"], {"metadata": {"labels": {"finetune.ai/job": "victim"}}})
    assert post_progress(operator, namespace, "victim", pod_token(kubectl, other_pod), body) == 403
    # The victim's own pod, reporting for the other job.
    victim_token = pod_token(kubectl, victim_pod)
    assert post_progress(operator, namespace, "other", victim_token, body) == 403
    # The victim's own pod, through another namespace's path.
    assert post_progress(operator, "kube-system", "victim", victim_token, body) == 403
    # And the victim's own pod for its own job: accepted.
    assert post_progress(operator, namespace, "victim", victim_token, body) == 202
    wait_for(lambda: (kubectl.get("ftj", "victim")["status"].get("progress") or {}).get("step") == 9, 15,
             what="the victim's own report")
    assert "progress" not in kubectl.get("ftj", "other").get("status", {})


def test_reports_are_written_at_most_once_per_interval(kubectl, namespace, operator):
    """FINETUNE_PROGRESS_INTERVAL_SECONDS is 2 here: 20 reports over about 4 s make at most 3
    status writes, and the last report wins."""
    kubectl.create(job_manifest())
    token = pod_token(kubectl, trainer_pod(kubectl, "demo"))
    wait_for(lambda: kubectl.get("ftj", "demo").get("status", {}).get("phase"), 30, what="a phase")
    seen = set()  # the steps the status showed: each one a write
    started = time.monotonic()
    for step in range(1, 21):
        assert post_progress(operator, namespace, "demo", token, {"step": step, "totalSteps": 40}) == 202
        time.sleep(0.2)
        seen.add((kubectl.get("ftj", "demo").get("status", {}).get("progress") or {}).get("step"))
    elapsed = time.monotonic() - started
    wait_for(lambda: (kubectl.get("ftj", "demo")["status"].get("progress") or {}).get("step") == 20, 10,
             what="the last report")
    writes = len(seen - {None})
    assert 1 <= writes <= elapsed / 2 + 1, (writes, elapsed)
