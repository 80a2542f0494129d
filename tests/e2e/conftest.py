"""Fixtures for end-to-end tests: helm from the binary cache, and a process node (a node whose
pods really run, as local processes) for the trainer and the Helm-installed operator."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kubetools import CACHE, REPO, ProcessNode

HELM = str(CACHE / "bin" / "helm")
CHART = REPO / "charts" / "finetune-operator"
TAINT_KEY = "finetune.ai/process-node"


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


@pytest.fixture
def process_node(kubeconfig: str, tmp_path: Path, request):
    # Tainted, so only pods that tolerate it and select its hostname land there; PVCs resolve to
    # their hostPath PVs' directories.
    node = ProcessNode(kubeconfig, tmp_path, "e2e", ["--heartbeat-seconds", "5", "--shutdown-grace-seconds", "5"],
                       taint_key=TAINT_KEY).start()
    yield node
    node.stop()
    node.delete()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"\n----- process node log ({node.log_path}) -----\n{node.log[-6000:]}")
