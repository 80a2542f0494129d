"""Fixtures shared by every layer. Integration fixtures reuse the running local control plane
(`make cluster`, or the one `make test` starts) and give each test its own namespace."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from kubetools import REPO, Kubectl, OperatorProcess, wait_for


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.integration)


# A skip is allowed only for a test marked `gpu` on a machine without CUDA. Any other skip (a
# module whose imports failed, a fixture that gave up) is a broken install or a broken test, and
# fails the run instead of hiding as a yellow "s".
_UNEXPECTED_SKIPS: list[str] = []


def pytest_collectreport(report):
    if report.skipped:
        _UNEXPECTED_SKIPS.append(f"{report.nodeid}: {report.longrepr}")


def pytest_runtest_logreport(report):
    if report.skipped and "gpu" not in report.keywords:
        _UNEXPECTED_SKIPS.append(f"{report.nodeid}: {report.longrepr}")


def pytest_sessionfinish(session, exitstatus):
    if _UNEXPECTED_SKIPS and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if _UNEXPECTED_SKIPS:
        terminalreporter.section("skipped without being marked gpu (the run fails)")
        for line in _UNEXPECTED_SKIPS:
            terminalreporter.line(line)


@pytest.fixture(scope="session")
def kubeconfig() -> str:
    path = os.environ.get("KUBECONFIG") or str(REPO / ".cluster" / "kubeconfig")
    if not Path(path).exists():
        pytest.fail(f"no local cluster ({path} missing): run `make cluster`, or run the tests with `make test`")
    proc = Kubectl(path)("get", "--raw", "/readyz", check=False)
    if proc.returncode != 0:
        pytest.fail(f"the cluster in {path} is not ready: {proc.stderr.strip()}")
    return path


@pytest.fixture(scope="session")
def crds(kubeconfig: str) -> None:
    """Install the checked-in CRDs once per session (deleting CRDs between tests is racy)."""
    kubectl = Kubectl(kubeconfig)
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    kubectl("wait", "--for=condition=Established", "--timeout=60s",
            "crd/finetunejobs.finetune.ai", "crd/models.finetune.ai")


@pytest.fixture
def namespace(kubeconfig: str, crds: None) -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    kubectl = Kubectl(kubeconfig)
    kubectl("create", "namespace", name)
    wait_for(lambda: kubectl("-n", name, "get", "serviceaccount", "default", check=False).returncode == 0,
             30, what="the namespace's default ServiceAccount")
    yield name
    # The operator is gone by now, so nothing would remove the node-pool finalizer of jobs with a
    # Karpenter pool: release their pools here and strip it, or the namespace never goes away.
    scoped = Kubectl(kubeconfig, name)
    for ftj in scoped.items("finetunejobs.finetune.ai"):
        scoped("patch", "finetunejobs.finetune.ai", ftj["metadata"]["name"], "--type=merge",
               "-p", '{"metadata": {"finalizers": null}}', check=False)
    if kubectl("get", "crd", "nodepools.karpenter.sh", check=False).returncode == 0:
        kubectl("delete", "nodepools.karpenter.sh", "-l", f"finetune.ai/namespace={name}", "--wait=false", check=False)
    kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def kubectl(kubeconfig: str, namespace: str) -> Kubectl:
    return Kubectl(kubeconfig, namespace)


@pytest.fixture
def operator_env() -> dict[str, str]:
    """Extra environment (operator settings) for the `operator` fixture; modules override it."""
    return {}


@pytest.fixture
def operator(kubeconfig: str, namespace: str, tmp_path: Path, request, operator_env) -> OperatorProcess:
    """A running operator watching only this test's namespace; its log is shown on failure."""
    op = OperatorProcess(kubeconfig, namespace, tmp_path / "operator.log", env=operator_env).start()
    op.wait_leading()
    yield op
    op.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"\n----- operator log ({op.log_path}) -----\n{op.log[-8000:]}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def claims(kubeconfig: str, namespace: str, kubectl: Kubectl):
    """PersistentVolumeClaims `data` and `models`, bound to pre-made PersistentVolumes, as a
    trainer pod needs them to be scheduled. (kwok runs no container, so nothing is mounted.)"""
    cluster = Kubectl(kubeconfig)
    names = ["data", "models"]
    for claim in names:
        pv = f"{namespace}-{claim}"
        cluster.apply({
            "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "",
                     "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": f"/tmp/finetune-test-pv/{pv}"},
                     "claimRef": {"namespace": namespace, "name": claim}},
        })
        kubectl.apply({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": pv,
                     "resources": {"requests": {"storage": "1Gi"}}},
        })
    wait_for(lambda: all(kubectl.get("pvc", c)["status"].get("phase") == "Bound" for c in names), 60,
             what="the claims to bind")
    yield names
    for claim in names:
        cluster("delete", "pv", f"{namespace}-{claim}", "--wait=false", check=False)
