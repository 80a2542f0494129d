"""The process node against the real local control plane: pods really run as local processes."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from kubetools import CLUSTER_DNS, REPO, Kubectl, wait_for

pytestmark = pytest.mark.integration

HOST_PATHS = ("/etc/finetune", "/mnt/pvc", "/dev/termination-log")


def pod(name: str, node: str, script: str, *, via_scheduler: bool = False, **container: object) -> dict:
    placement = {"nodeSelector": {"kubernetes.io/hostname": node}} if via_scheduler else {"nodeName": node}
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "annotations": {"note": "from-annotation"}},
        "spec": {
            **placement, "restartPolicy": "Never", "terminationGracePeriodSeconds": 2,
            "automountServiceAccountToken": False,
            "containers": [{"name": "main", "image": "unused", "command": [sys.executable, "-c", textwrap.dedent(script)],
                            **container}],
        },
    }


def terminated(kubectl: Kubectl, name: str, timeout: float = 30) -> dict:
    def done() -> dict | None:
        p = kubectl.get("pod", name)
        return p if p and p["status"].get("phase") in ("Succeeded", "Failed") else None
    return wait_for(done, timeout, what=f"pod {name} to finish")


def pvc_bound_to_host_dir(kubectl: Kubectl, namespace: str, claim: str, directory: Path) -> None:
    """A PVC bound to a hostPath PV by the PV controller. (Pre-binding it with the
    bind-completed annotation races the controller's informer: a claim it sees before its PV
    is marked Lost for good.)"""
    pv = f"{namespace}-{claim}"
    kubectl.create({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
                    "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                             "hostPath": {"path": str(directory)}, "storageClassName": "",
                             "claimRef": {"namespace": namespace, "name": claim}}})
    kubectl.create({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}},
                             "storageClassName": "", "volumeName": pv}})
    wait_for(lambda: kubectl.get("pvc", claim)["status"].get("phase") == "Bound", 60, what=f"claim {claim} to bind")


def test_node_registers_with_lease_and_goes_away(process_node, kubectl: Kubectl) -> None:
    node = kubectl.get("node", process_node.name)
    labels = node["metadata"]["labels"]
    assert labels["finetune.ai/process-node"] == "true"
    assert labels["node.kubernetes.io/instance-type"] == "local-process"
    assert labels["kubernetes.io/hostname"] == process_node.name
    assert "kwok.x-k8s.io/node" not in (node["metadata"].get("annotations") or {})
    assert node["status"]["addresses"][0] == {"type": "InternalIP", "address": "127.0.0.1"}
    # nvidia.com/gpu: the two devices the fixture gives the node (--device nvidia.com/gpu=3,5).
    assert node["status"]["capacity"] == {"cpu": "4", "memory": "16Gi", "pods": "10", "nvidia.com/gpu": "2"}
    lease = Kubectl(process_node.kubeconfig, "kube-node-lease").get("lease", process_node.name)
    assert lease["spec"]["holderIdentity"] == process_node.name
    first = lease["spec"]["renewTime"]
    wait_for(lambda: Kubectl(process_node.kubeconfig, "kube-node-lease").get("lease", process_node.name)
             ["spec"]["renewTime"] != first, 10, what="the lease to be renewed")
    assert process_node.stop() == 0
    assert kubectl.get("node", process_node.name) is None


def test_pod_runs_with_config_env_and_pvc(process_node, kubectl: Kubectl, namespace: str) -> None:
    existed = {p: os.path.lexists(p) for p in HOST_PATHS}
    kubectl.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"},
                    "data": {"config.json": '{"lr": 0.1}', "lr": "0.1", "unused": "x"}})
    pvc_bound_to_host_dir(kubectl, namespace, "data", process_node.data_dir)
    # The emptyDir on /tmp is empty but for the node's own Python environment, which the node
    # binds back on top when it lives under /tmp (a checkout there).
    runtime_under_tmp = sorted({Path(p).parts[2] for p in {sys.prefix, sys.base_prefix, str(REPO)}
                                if Path(p).is_relative_to("/tmp") and len(Path(p).parts) > 2})
    script = f"RUNTIME_UNDER_TMP = {runtime_under_tmp!r}\n" + textwrap.dedent("""
        import json, os, sys
        config = json.load(open("/etc/finetune/trainer.json"))
        assert not os.path.exists("/etc/finetune/unused"), "items must be honoured"
        assert sorted(os.listdir("/tmp")) == RUNTIME_UNDER_TMP, os.listdir("/tmp")
        try:
            open("/etc/finetune/x", "w")
            sys.exit("config volume is writable")
        except OSError:
            pass
        out = {"config": config, "argv": sys.argv[1:], "env": {k: os.environ[k] for k in
               ("POD_NAME", "POD_NAMESPACE", "NOTE", "NODE", "LR", "GREETING")}, "cwd": os.getcwd()}
        open("/mnt/pvc/data/out.json", "w").write(json.dumps(out))
        open("/dev/termination-log", "w").write(json.dumps({"ok": True}))
        print("runner finished", flush=True)
    """)
    manifest = pod("runner", process_node.name, script, via_scheduler=True,
                   args=["$(GREETING)-$(LR)", "$$(LR)", "$(UNKNOWN)"],
                   env=[{"name": "GREETING", "value": "hello"},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {"name": "NOTE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['note']"}}},
                        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                        {"name": "LR", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "lr"}}}],
                   volumeMounts=[{"name": "config", "mountPath": "/etc/finetune", "readOnly": True},
                                 {"name": "data", "mountPath": "/mnt/pvc/data"},
                                 {"name": "tmp", "mountPath": "/tmp"}],
                   workingDir="/mnt/pvc/data")
    manifest["spec"]["volumes"] = [
        {"name": "config", "configMap": {"name": "cfg", "items": [{"key": "config.json", "path": "trainer.json"}]}},
        {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
        {"name": "tmp", "emptyDir": {}},
    ]
    kubectl.create(manifest)
    done = terminated(kubectl, "runner")
    status = done["status"]
    state = status["containerStatuses"][0]["state"]["terminated"]
    assert status["phase"] == "Succeeded", state
    assert state["exitCode"] == 0 and state["reason"] == "Completed"
    assert json.loads(state["message"]) == {"ok": True}
    assert state["startedAt"] and state["finishedAt"]
    assert status["podIP"].startswith("127.") and status["hostIP"] == "127.0.0.1"
    out = json.loads((process_node.data_dir / "out.json").read_text())
    assert out["config"] == {"lr": 0.1}
    assert out["argv"] == ["hello-0.1", "$(LR)", "$(UNKNOWN)"]
    assert out["env"] == {"POD_NAME": "runner", "POD_NAMESPACE": namespace, "NOTE": "from-annotation",
                          "NODE": process_node.name, "LR": "0.1", "GREETING": "hello"}
    assert out["cwd"] == "/mnt/pvc/data"
    assert {p: os.path.lexists(p) for p in HOST_PATHS} == existed, "mounts leaked onto the host"
    assert kubectl("logs", "runner").stdout == "runner finished\n"  # served by the node on 127.0.0.1


def test_failing_command_fails_the_pod(process_node, kubectl: Kubectl) -> None:
    kubectl.create(pod("crash", process_node.name, "import sys; print('boom: bad config'); sys.exit(3)",
                       terminationMessagePolicy="FallbackToLogsOnError"))
    kubectl.create(pod("no-such", process_node.name, "", command=["definitely-not-a-command-xyz"]))
    status = terminated(kubectl, "crash")["status"]
    state = status["containerStatuses"][0]["state"]["terminated"]
    assert status["phase"] == "Failed"
    assert (state["exitCode"], state["reason"]) == (3, "Error")
    assert "boom: bad config" in state["message"]
    missing = terminated(kubectl, "no-such")["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (missing["exitCode"], missing["reason"]) == (128, "StartError")
    assert "definitely-not-a-command-xyz" in missing["message"]


def test_unsupported_pod_is_rejected(process_node, kubectl: Kubectl) -> None:
    manifest = pod("two", process_node.name, "pass")
    manifest["spec"]["containers"].append({"name": "second", "image": "unused", "command": ["true"]})
    kubectl.create(manifest)
    status = terminated(kubectl, "two")["status"]
    assert status["phase"] == "Failed" and status["reason"] == "UnsupportedByProcessNode"
    assert "single-container" in status["message"]


def _running_pid(kubectl: Kubectl, name: str) -> int:
    def running() -> int | None:
        p = kubectl.get("pod", name)
        if not p or p["status"].get("phase") != "Running":
            return None
        return int(p["status"]["containerStatuses"][0]["containerID"].removeprefix("process://"))
    return wait_for(running, 30, what=f"pod {name} Running")


def _alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for a parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


STUBBORN = """
    import signal, time, pathlib
    def on_term(*_):
        pathlib.Path("/mnt/pvc/data/got-sigterm").write_text("yes")   # ...and keep running
    signal.signal(signal.SIGTERM, on_term)
    pathlib.Path("/mnt/pvc/data/started").write_text("yes")
    while True:
        time.sleep(0.1)
"""


def _stubborn_pod(name: str, node: str) -> dict:
    manifest = pod(name, node, STUBBORN, volumeMounts=[{"name": "data", "mountPath": "/mnt/pvc/data"}])
    manifest["spec"]["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]
    return manifest


def test_deletion_terminates_then_kills(process_node, kubectl: Kubectl) -> None:
    kubectl.create(_stubborn_pod("sleeper", process_node.name))
    pid = _running_pid(kubectl, "sleeper")
    wait_for(lambda: (process_node.data_dir / "started").exists(), 10, what="the process to start")
    assert _alive(pid)
    kubectl("delete", "pod", "sleeper", "--wait=false")
    wait_for(lambda: kubectl.get("pod", "sleeper") is None, 20, what="the pod to be deleted")
    assert (process_node.data_dir / "got-sigterm").read_text() == "yes"
    assert not _alive(pid)


def test_node_shutdown_leaves_no_process(process_node, kubectl: Kubectl) -> None:
    kubectl.create(_stubborn_pod("orphan", process_node.name))
    pid = _running_pid(kubectl, "orphan")
    assert process_node.stop() == 0
    assert not _alive(pid)
    status = kubectl.get("pod", "orphan")["status"]
    assert status["phase"] == "Failed" and status["reason"] == "Terminated"


def test_restarted_node_reports_lost_containers(process_node, kubectl: Kubectl) -> None:
    kubectl.create(_stubborn_pod("lost", process_node.name))
    started = _running_pid(kubectl, "lost")
    process_node.kill()
    wait_for(lambda: not _alive(started), 10, what="the container to die with its node")
    process_node.start()  # same name and state dir: adopts its Node
    status = wait_for(lambda: (p := kubectl.get("pod", "lost")) and p["status"]["phase"] == "Failed" and p["status"], 20,
                      what="the lost pod to fail")
    state = status["containerStatuses"][0]["state"]["terminated"]
    assert (state["exitCode"], state["reason"]) == (137, "ContainerStatusUnknown")
    kubectl("delete", "pod", "lost", "--timeout=20s")


IN_CLUSTER = """
    import json, os, ssl, urllib.request
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    token = open(f"{sa}/token").read()
    ctx = ssl.create_default_context(cafile=f"{sa}/ca.crt")
    url = f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}"
    body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode()
    req = urllib.request.Request(url + "/apis/authentication.k8s.io/v1/selfsubjectreviews", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    user = json.load(urllib.request.urlopen(req, context=ctx))["status"]["userInfo"]
    open("/dev/termination-log", "w").write(json.dumps({"user": user["username"],
                                                        "namespace": open(f"{sa}/namespace").read()}))
"""


def test_service_account_token_authenticates_in_cluster(process_node, kubectl: Kubectl, namespace: str) -> None:
    """The projected kube-api-access volume (TokenRequest token, kube-root-ca.crt, namespace) and
    the KUBERNETES_SERVICE_* env let an in-cluster client reach the API server as the pod's
    ServiceAccount."""
    kubectl.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "robot"}})
    wait_for(lambda: kubectl.get("configmap", "kube-root-ca.crt"), 30, what="kube-root-ca.crt")
    manifest = pod("whoami", process_node.name, IN_CLUSTER)
    manifest["spec"] |= {"automountServiceAccountToken": True, "serviceAccountName": "robot"}
    kubectl.create(manifest)
    status = terminated(kubectl, "whoami")["status"]
    state = status["containerStatuses"][0]["state"]["terminated"]
    assert status["phase"] == "Succeeded", state
    assert json.loads(state["message"]) == {"user": f"system:serviceaccount:{namespace}:robot", "namespace": namespace}
    assert not any(Path(p).exists() for p in ("/var/run/secrets/kubernetes.io",))


def test_restart_policy_restarts_the_container(process_node, kubectl: Kubectl) -> None:
    """restartPolicy OnFailure (Always likewise, as a Deployment's pods have): an exited container
    is run again in the same pod, with restartCount and lastState, after a back-off."""
    script = """
        import pathlib, sys
        marker = pathlib.Path("/tmp/ran-before")
        if not marker.exists():
            marker.write_text("yes")
            sys.exit(3)
    """
    manifest = pod("flaky", process_node.name, script, volumeMounts=[{"name": "scratch", "mountPath": "/tmp"}])
    manifest["spec"] |= {"restartPolicy": "OnFailure", "volumes": [{"name": "scratch", "emptyDir": {}}]}
    kubectl.create(manifest)
    status = terminated(kubectl, "flaky", timeout=60)["status"]
    cs = status["containerStatuses"][0]
    assert status["phase"] == "Succeeded" and cs["restartCount"] == 1, status
    assert cs["state"]["terminated"]["exitCode"] == 0


def test_pod_names_resolve_through_cluster_dns(process_node, kubectl: Kubectl, namespace: str) -> None:
    """As under a kubelet: the pod's hostname is spec.hostname in its own UTS namespace, /etc/hosts
    names its FQDN under spec.subdomain, and /etc/resolv.conf points at the cluster DNS, through
    which Services and the pods of a headless Service resolve; the host's files stay as they were."""
    host_files = {p: Path(p).read_text() for p in ("/etc/hosts", "/etc/resolv.conf")}
    kubectl.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "peers"},
                    "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"app": "dns-probe"},
                             "ports": [{"name": "p", "port": 29500}]}})
    script = """
        import json, socket
        def resolve(name):
            try:
                return sorted({a[4][0] for a in socket.getaddrinfo(name, None, socket.AF_INET)})
            except socket.gaierror as exc:
                return str(exc)
        own = "probe-0.peers"   # the search path completes it to probe-0.peers.<ns>.svc.cluster.local
        for _ in range(100):    # until the endpoint controller has published this pod
            if isinstance(resolve(own), list):
                break
            __import__("time").sleep(0.2)
        print(json.dumps({"hostname": socket.gethostname(), "hosts": open("/etc/hosts").read(),
                          "resolv": open("/etc/resolv.conf").read(), "own": resolve(own),
                          "kubernetes": resolve("kubernetes.default"), "outside": resolve("example.com")}))
    """
    manifest = pod("probe-0-xyz", process_node.name, script)
    manifest["metadata"]["labels"] = {"app": "dns-probe"}
    manifest["spec"] |= {"hostname": "probe-0", "subdomain": "peers"}
    kubectl.create(manifest)
    done = terminated(kubectl, "probe-0-xyz", timeout=60)
    assert done["status"]["phase"] == "Succeeded", process_node.container_log(namespace, "probe-0")
    out = json.loads(kubectl("logs", "probe-0-xyz").stdout)
    assert out["hostname"] == "probe-0"
    assert out["resolv"] == (f"nameserver {CLUSTER_DNS}\nsearch {namespace}.svc.cluster.local svc.cluster.local "
                             "cluster.local\noptions ndots:5\n")
    assert f"127.0.0.1\tprobe-0.peers.{namespace}.svc.cluster.local\tprobe-0" in out["hosts"].splitlines()
    assert out["own"] == ["127.0.0.1"], out["own"]               # the pod's A record, from CoreDNS
    kubernetes_ip = Kubectl(kubectl.kubeconfig, "default").get("service", "kubernetes")["spec"]["clusterIP"]
    assert out["kubernetes"] == [kubernetes_ip]
    assert isinstance(out["outside"], str), "names outside the cluster must not resolve"
    assert {p: Path(p).read_text() for p in host_files} == host_files


def test_host_ports_admit_one_pod_at_a_time(process_node, kubectl: Kubectl) -> None:
    """Like the kubelet's NodePorts admission (the scheduler's check, for pods bound by nodeName):
    a second hostNetwork pod with the same port is rejected while the first runs."""
    def hostnet(name: str) -> dict:
        manifest = pod(name, process_node.name, "import time; time.sleep(30)",
                       ports=[{"name": "metrics", "containerPort": 19090}])
        manifest["spec"]["hostNetwork"] = True
        return manifest
    kubectl.create(hostnet("first"))
    wait_for(lambda: kubectl.get("pod", "first")["status"].get("phase") == "Running", 30, what="the first pod to run")
    kubectl.create(hostnet("second"))
    status = terminated(kubectl, "second")["status"]
    assert status["phase"] == "Failed" and status["reason"] == "NodePorts", status
    assert "TCP 0.0.0.0:19090 is taken" in status["message"]
    assert kubectl.get("pod", "first")["status"]["phase"] == "Running"
    kubectl("delete", "pod", "first", "--wait=false")


def test_each_container_sees_only_the_devices_it_was_given(process_node, kubectl: Kubectl) -> None:
    """`--device nvidia.com/gpu=3,5`: the node advertises two GPUs and gives each container that
    asks for one its own, by CUDA_VISIBLE_DEVICES and NVIDIA_VISIBLE_DEVICES, as a device plugin
    would; a pod asking for more than is free is rejected at admission; a finished pod's device
    is free again."""
    node = kubectl.get("node", process_node.name)
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "2"
    script = """
        import os, time
        seen = os.environ.get("CUDA_VISIBLE_DEVICES", "-") + "/" + os.environ.get("NVIDIA_VISIBLE_DEVICES", "-")
        open("/dev/termination-log", "w").write(seen)
        time.sleep(float(os.environ["HOLD"]))
    """
    def gpu_pod(name: str, hold: float, gpus: int = 1) -> dict:
        limits = {"nvidia.com/gpu": str(gpus)}
        return pod(name, process_node.name, script, env=[{"name": "HOLD", "value": str(hold)},
                                                          {"name": "CUDA_VISIBLE_DEVICES", "value": "0,1,2,3,4,5"}],
                   resources={"requests": limits, "limits": limits})
    kubectl.create(gpu_pod("gpu-a", 8))
    kubectl.create(gpu_pod("gpu-b", 8))
    for name in ("gpu-a", "gpu-b"):
        wait_for(lambda: kubectl.get("pod", name)["status"].get("phase") == "Running", 30, what=f"{name} to run")
    kubectl.create(gpu_pod("gpu-c", 0))
    rejected = terminated(kubectl, "gpu-c")["status"]
    assert rejected["phase"] == "Failed" and rejected["reason"] == "UnexpectedAdmissionError", rejected
    assert "nvidia.com/gpu: 1 requested, 0 of 2 free" in rejected["message"]
    seen = {name: terminated(kubectl, name)["status"]["containerStatuses"][0]["state"]["terminated"]["message"]
            for name in ("gpu-a", "gpu-b")}
    # Each its own, and the pod's own CUDA_VISIBLE_DEVICES cannot widen it.
    assert sorted(seen.values()) == ["3/3", "5/5"], seen
    kubectl.create(gpu_pod("gpu-d", 0, gpus=2))
    after = terminated(kubectl, "gpu-d")["status"]
    assert after["phase"] == "Succeeded", after
    assert after["containerStatuses"][0]["state"]["terminated"]["message"] == "3,5/3,5"
