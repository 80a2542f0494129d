"""The process node's pure pieces: env resolution, $(VAR) expansion, volume files, statuses."""

from __future__ import annotations

import asyncio
import base64
import stat
from pathlib import Path

import pytest

from process_node import envvars, podstatus, volumes, worker
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
             {"name": "token", "projected": {"sources": []}}]
    paths = asyncio.run(volumes.materialise(specs, tmp_path / "v", fetch, claim_dir))
    assert (paths["cfg"] / "sub/one.txt").read_text() == "1" and not (paths["cfg"] / "b").exists()
    assert sorted(p.name for p in paths["all"].iterdir()) == ["a", "b", "bin"]
    assert stat.S_IMODE((paths["all"] / "a").stat().st_mode) == 0o600
    assert (paths["sec"] / "token").read_bytes() == b"t0k"
    assert stat.S_IMODE((paths["sec"] / "token").stat().st_mode) == 0o400
    assert paths["scratch"].is_dir() and paths["data"] == tmp_path / "claims" / "data" and paths["data"].is_dir()
    assert "token" not in paths
    with pytest.raises(volumes.VolumeError):
        asyncio.run(volumes.materialise([{"name": "x", "configMap": {"name": "nope"}}], tmp_path / "v", fetch, claim_dir))


def test_admission() -> None:
    assert worker.admit(POD)["name"] == "c"
    for change, words in [({"initContainers": [{}]}, "init containers"),
                          ({"restartPolicy": "OnFailure"}, "only Never"),
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
