"""Fixtures for end-to-end tests: helm from the binary cache, and the local cluster's real node
(local-0: the upstream kubelet with containerd and runc, started by hack/cluster.sh) whose pods
run the product's own images."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from finetune_operator import __version__
from kubetools import CACHE, REPO, Kubectl

HELM = str(CACHE / "bin" / "helm")
CHART = REPO / "charts" / "finetune-operator"
LOCAL_NODE_VALUES = CHART / "ci" / "local-node-values.yaml"
NODE_LABEL = "finetune.ai/local-node"
# The names `make images` gives the images and the cluster script imports into containerd.
TRAINER_IMAGE = f"finetune-trainer:{__version__}"
OPERATOR_IMAGE = f"finetune-operator:{__version__}"
# build_job runs the trainer as this user; hostPath volumes keep their owners.
TRAINER_UID = 1000


@pytest.fixture(scope="session")
def helm(kubeconfig: str):
    if not Path(HELM).exists():
        pytest.fail(f"no helm at {HELM}: run `hack/build-binaries.sh helm` (make test does)")

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([HELM, "--kubeconfig", kubeconfig, *args], capture_output=True, text=True, timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc
    return run


@dataclass(frozen=True)
class LocalNode:
    name: str
    node: dict

    @property
    def placement(self) -> dict:
        """nodeSelector and toleration that put a pod on this node (it is tainted)."""
        return {"nodeSelector": {NODE_LABEL: "true"},
                "tolerations": [{"key": NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}]}


@pytest.fixture(scope="session")
def local_node(kubeconfig: str) -> LocalNode:
    nodes = Kubectl(kubeconfig).json("get", "nodes", "-l", NODE_LABEL)["items"]
    if not nodes:
        pytest.fail("the cluster has no real node (hack/cluster.sh up starts local-0): run the tests with `make test`")
    node = nodes[0]
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])
    assert ready, f"node {node['metadata']['name']} is not Ready: {node['status']['conditions']}"
    return LocalNode(node["metadata"]["name"], node)


def volume_dirs(kubeconfig: str, namespace: str) -> tuple[Path, Path]:
    """The host directories behind the `claims` fixture's PVs `data` and `models`, made, with the
    output directory owned by the trainer's user."""
    cluster = Kubectl(kubeconfig)
    data = Path(cluster.get("pv", f"{namespace}-data")["spec"]["hostPath"]["path"])
    models = Path(cluster.get("pv", f"{namespace}-models")["spec"]["hostPath"]["path"])
    for d in (data, models):
        d.mkdir(parents=True, exist_ok=True)
    os.chown(models, TRAINER_UID, TRAINER_UID)
    # The destination is a subPath the kubelet creates as root with this mode: setgid and
    # group-writable, so it is the trainer's group's to write (docs/outputs.md).
    models.chmod(0o2775)
    return data, models
