"""Fixtures for end-to-end tests: helm from the binary cache, and the local cluster's real node
(local-0: the upstream kubelet with containerd and runc, started by hack/cluster.sh) whose pods
run the product's own images."""

from __future__ import annotations

import os
import shlex
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
# The last release (the upgrade test installs it): its version and the commit it was cut from.
PREVIOUS_RELEASE = ("0.1.0", "72de466ffeaf207ca354022cddae44e2a05d53f9")


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


@dataclass(frozen=True)
class Release:
    version: str
    chart: Path
    operator_image: str  # as the chart's values name it (containerd adds docker.io/library/)


@pytest.fixture(scope="session")
def previous_release(kubeconfig: str, tmp_path_factory: pytest.TempPathFactory) -> Release:
    """The previous release's chart and operator image, built from its commit with its own
    hack/images.sh (into a cache of its own: the archive is built once per machine) and imported
    into the real node's containerd. Its trainer image is not rebuilt (400 s and 3.2 GB): the
    upgrade test runs the current one under the old operator."""
    version, commit = PREVIOUS_RELEASE
    if subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True).returncode:
        pytest.fail(f"release {version}'s commit {commit} is not in this clone's history (a shallow clone?); "
                    "the upgrade test builds that release from it")
    tree = tmp_path_factory.mktemp(f"release-{version}")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    cache = CACHE / "releases" / version
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / "images.log"
    with open(log, "w") as err:
        built = subprocess.run([str(tree / "hack" / "images.sh"), "operator"], stdout=subprocess.PIPE, stderr=err,
                               text=True, env={**os.environ, "FTO_CACHE": str(cache)}, timeout=1200)
    assert built.returncode == 0, f"building release {version}'s operator image failed; see {log}"
    images = dict(line.split("=", 1) for line in Path(built.stdout.strip()).read_text().splitlines()
                  if line and not line.startswith("#"))
    image = shlex.split(images["OPERATOR_IMAGE"])[0]
    socket = Path(kubeconfig).parent / "node" / "containerd.sock"
    subprocess.run(["ctr", "--address", str(socket), "--namespace", "k8s.io", "images", "import", "--snapshotter",
                    "overlayfs", "--base-name", image.rsplit(":", 1)[0], shlex.split(images["OPERATOR_IMAGE_ARCHIVE"])[0]],
                   capture_output=True, check=True, timeout=300)
    return Release(version, tree / "charts" / "finetune-operator", image.removeprefix("docker.io/library/"))


def containerd_task(kubeconfig: str, pod: dict, action: str) -> None:
    """Pause or resume (cgroup freezer) the first container of a pod on the real node."""
    socket = Path(kubeconfig).parent / "node" / "containerd.sock"
    container = pod["status"]["containerStatuses"][0]["containerID"].removeprefix("containerd://")
    subprocess.run(["ctr", "--address", str(socket), "--namespace", "k8s.io", "tasks", action, container],
                   capture_output=True, check=True, timeout=60)
