"""The process node's pure pieces: env resolution, $(VAR) expansion, volume files, statuses."""

from __future__ import annotations

import asyncio
import base64
import stat
from pathlib import Path

import pytest

from process_node import devices, envvars, podstatus, volumes, worker
from process_node.runtime import tail

POD = {"metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"app": "x"},
                    "annotations": {"batch.kubernetes.io/job-completion-index": "2"}},
       "spec": {"nodeName": "local-0", "restartPolicy": "Never", "containers": [{"name": "c", "command": ["true"]}]}}
OBJECTS = {("ConfigMap", "cm"): {"data": {"a": "1", "b": "2"}, "binaryData": {"bin": base64.b64encode(b"\x00").decode()}},
           ("Secret", "s"): {"data": {"token": base64.b64encode(b"t0k").decode()}}}


async def fetch(kind: str, name: str) -> dict | None:
    return OBJECTS.get((kind, name))


def test_expand_like_the_kubelet() -> None:
    env = {"A": "1", "B": "x"}
    assert envvars.expand("$(A)-$(B)", env) == "1-x"
    assert envvars.expand("$$(A) $(MISSING) $", env) == "$(A) $(MISSING) $"


def test_field_refs() -> None:
    assert envvars.field_ref(POD, "metadata.annotations['batch.kubernetes.io/job-completion-index']", "127.0.0.1") == "2"
    assert envvars.field_ref(POD, "metadata.labels['app']", "") == "x"
    assert envvars.field_ref(POD, "status.podIP", "127.0.0.1") == "127.0.0.1"
    assert envvars.field_ref(POD, "metadata.uid", "") == "u-1"


def test_resolve_env_in_order_with_refs() -> None:
    container = {"env": [{"name": "X", "value": "a"}, {"name": "Y", "value": "$(X)b"},
                         {"name": "T", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}},
                         {"name": "M", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "a"}}},
                         {"name": "O", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "a", "optional": True}}}],
                 "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"}]}
    env = asyncio.run(envvars.resolve(POD, container, fetch, "127.0.0.1"))
    assert env == {"CM_a": "1", "CM_b": "2", "X": "a", "Y": "ab", "T": "t0k", "M": "1"}
    with pytest.raises(envvars.EnvError, match="not found"):
        asyncio.run(envvars.resolve(POD, {"env": [{"name": "Z", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "a"}}}]},
                                    fetch, ""))


def test_volumes_items_modes_and_claims(tmp_path: Path) -> None:
    async def claim_dir(claim: str) -> Path:
        return tmp_path / "claims" / claim
    specs = [{"name": "cfg", "configMap": {"name": "cm", "items": [{"key": "a", "path": "sub/one.txt"}]}},
             {"name": "all", "configMap": {"name": "cm", "defaultMode": 0o600}},
             {"name": "sec", "secret": {"secretName": "s"}},
             {"name": "scratch", "emptyDir": {}},
             {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
             {"name": "empty", "projected": {"sources": []}}]
    paths = asyncio.run(volumes.materialise(specs, tmp_path / "v", fetch, claim_dir))
    assert (paths["cfg"] / "sub/one.txt").read_text() == "1" and not (paths["cfg"] / "b").exists()
    assert sorted(p.name for p in paths["all"].iterdir()) == ["a", "b", "bin"]
    assert stat.S_IMODE((paths["all"] / "a").stat().st_mode) == 0o600
    assert (paths["sec"] / "token").read_bytes() == b"t0k"
    assert stat.S_IMODE((paths["sec"] / "token").stat().st_mode) == 0o400
    assert paths["scratch"].is_dir() and paths["data"] == tmp_path / "claims" / "data" and paths["data"].is_dir()
    assert paths["empty"].is_dir() and not any(paths["empty"].iterdir())
    with pytest.raises(volumes.VolumeError):
        asyncio.run(volumes.materialise([{"name": "x", "configMap": {"name": "nope"}}], tmp_path / "v", fetch, claim_dir))


def test_admission() -> None:
    assert worker.admit(POD)["name"] == "c"
    for change, words in [({"initContainers": [{}]}, "init containers"),
                          ({"restartPolicy": "Sometimes"}, "unknown restartPolicy"),
                          ({"containers": [{"name": "c", "image": "i"}]}, "no command")]:
        with pytest.raises(worker.Unsupported, match=words):
            worker.admit({**POD, "spec": {**POD["spec"], **change}})


def test_terminated_status() -> None:
    result = podstatus.Terminated(1, "Error", "bad", "t0", "t1")
    status = podstatus.terminated(POD, POD["spec"]["containers"][0], "127.0.0.1", result, "process://9")
    assert status["phase"] == "Failed"
    assert status["containerStatuses"][0]["state"]["terminated"] == {
        "exitCode": 1, "reason": "Error", "message": "bad", "startedAt": "t0", "finishedAt": "t1",
        "containerID": "process://9"}
    assert podstatus.patch(POD, status)["metadata"] == {"uid": "u-1"}


def test_log_tail_limits(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    log.write_text("".join(f"line {i}\n" for i in range(200)))
    text = tail(log, 80, 2048)
    assert text.splitlines()[-1] == "line 199" and len(text.splitlines()) == 80
    assert len(tail(log, 80, 100)) == 100


def test_container_path_finds_this_interpreters_scripts(monkeypatch) -> None:
    import os
    import sys

    from process_node.kubelet import base_env
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("KUBECONFIG", "/secret/kubeconfig")
    env = base_env()
    assert env["PATH"].split(os.pathsep) == [os.path.dirname(sys.executable), "/usr/bin", "/bin"]
    assert "KUBECONFIG" not in env


def test_projected_service_account_volume(tmp_path: Path) -> None:
    """The volume the ServiceAccount admission plugin adds (kube-api-access-*): a TokenRequest
    token, the cluster CA from kube-root-ca.crt, and the namespace from the downward API."""
    asked = []

    async def token(audience, seconds):
        asked.append((audience, seconds))
        return f"tok-{len(asked)}"

    objects = {**OBJECTS, ("ConfigMap", "kube-root-ca.crt"): {"data": {"ca.crt": "CA"}}}

    async def fetch_all(kind, name):
        return objects.get((kind, name))

    async def no_claims(claim):
        raise AssertionError("no claims here")
    sources = [{"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
               {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
               {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]
    specs = [{"name": "kube-api-access", "projected": {"defaultMode": 0o644, "sources": sources}},
             {"name": "aud", "projected": {"sources": [{"serviceAccountToken": {"audience": "vault", "path": "t"}}]}},
             {"name": "labels", "downwardAPI": {"items": [{"path": "app", "fieldRef": {"fieldPath": "metadata.labels['app']"}}]}}]
    paths = asyncio.run(volumes.materialise(specs, tmp_path / "v", fetch_all, no_claims, token=token, pod=POD))
    root = paths["kube-api-access"]
    assert (root / "token").read_text() == "tok-1" and (root / "ca.crt").read_text() == "CA"
    assert (root / "namespace").read_text() == "ns"
    assert stat.S_IMODE((root / "token").stat().st_mode) == 0o644
    assert (paths["aud"] / "t").read_text() == "tok-2" and (paths["labels"] / "app").read_text() == "x"
    assert asked == [(None, 3607), ("vault", 3600)]
    # refresh: a new token replaces the file in place
    assert asyncio.run(volumes.write_tokens(root, sources, token, 0o644)) == 3607
    assert (root / "token").read_text() == "tok-3"
    with pytest.raises(volumes.VolumeError, match="kube-root-ca.crt"):
        asyncio.run(volumes.materialise(specs[:1], tmp_path / "w", fetch, no_claims, token=token, pod=POD))


def test_service_env_and_restart_rules() -> None:
    env = worker.service_env("https://127.0.0.1:6443")
    assert env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1" and env["KUBERNETES_SERVICE_PORT"] == "6443"
    assert env["KUBERNETES_PORT"] == "tcp://127.0.0.1:6443"
    assert worker.restarts("Always", 0) and worker.restarts("OnFailure", 1)
    assert not worker.restarts("OnFailure", 0) and not worker.restarts("Never", 1)
    result = podstatus.Terminated(1, "Error", "", "t0", "t1")
    status = podstatus.back_off(POD, POD["spec"]["containers"][0], "127.0.0.1", result, "process://9", 2, 20)
    cs = status["containerStatuses"][0]
    assert status["phase"] == "Running" and cs["restartCount"] == 2 and cs["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert cs["lastState"]["terminated"]["exitCode"] == 1


def test_host_ports_are_admitted_once_per_node() -> None:
    def with_ports(*ports: dict, host_network: bool = False) -> dict:
        return {"metadata": {"name": "x", "namespace": "ns"},
                "spec": {"hostNetwork": host_network, "containers": [{"name": "c", "ports": list(ports)}]}}
    # What the API server stores for a hostNetwork pod: hostPort = containerPort.
    trainer = with_ports({"containerPort": 9090, "hostPort": 9090, "name": "metrics"}, host_network=True)
    assert worker.host_ports(trainer) == {("TCP", "0.0.0.0", 9090)}
    assert worker.port_conflict(trainer, []) is None
    assert "NodePorts" in worker.port_conflict(trainer, [trainer])
    # Ports without a hostPort (a pod with its own IP) take nothing of the node's.
    assert worker.port_conflict(with_ports({"containerPort": 9090}), [with_ports({"containerPort": 9090})]) is None
    udp = with_ports({"containerPort": 9090, "hostPort": 9090, "protocol": "UDP"})
    assert worker.port_conflict(udp, [trainer]) is None
    on_ip = with_ports({"containerPort": 80, "hostPort": 8080, "hostIP": "127.0.0.2"})
    assert worker.port_conflict(with_ports({"containerPort": 80, "hostPort": 8080, "hostIP": "127.0.0.3"}), [on_ip]) is None
    assert worker.port_conflict(with_ports({"containerPort": 80, "hostPort": 8080}), [on_ip])


def test_devices_are_handed_out_once_and_come_back() -> None:
    owned = devices.Devices({"nvidia.com/gpu": ("0", "1", "2")})
    def asking(n: int) -> dict:
        return {"resources": {"limits": {"nvidia.com/gpu": str(n), "cpu": "1"}}}
    assert owned.allocate("a", asking(2)) == {"CUDA_VISIBLE_DEVICES": "0,1", "NVIDIA_VISIBLE_DEVICES": "0,1"}
    assert owned.allocate("a", asking(2))["CUDA_VISIBLE_DEVICES"] == "0,1"  # a restarted container keeps its share
    assert owned.allocate("b", asking(1))["CUDA_VISIBLE_DEVICES"] == "2"
    with pytest.raises(devices.DeviceError, match="1 requested, 0 of 3 free"):
        owned.allocate("c", asking(1))
    assert owned.allocate("d", {"resources": {}}) == {}  # asks for none, gets none
    owned.release("a")
    assert owned.allocate("c", asking(1))["CUDA_VISIBLE_DEVICES"] == "0"


def test_device_flags_name_distinct_ids() -> None:
    assert devices.parse("nvidia.com/gpu=0,1") == ("nvidia.com/gpu", ("0", "1"))
    for bad in ("nvidia.com/gpu", "nvidia.com/gpu=", "=0", "nvidia.com/gpu=0,0"):
        with pytest.raises(ValueError):
            devices.parse(bad)
