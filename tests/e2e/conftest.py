"""Fixtures for end-to-end tests: helm from the binary cache, and a process node (a node whose
pods really run, as local processes) for the trainer and the Helm-installed operator."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from kubetools import CACHE, REPO, Kubectl, wait_for

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


class ProcessNode:
    """`python -m process_node` for one test: tainted, so only pods that tolerate it and select
    its hostname land there; PVCs resolve to their hostPath PVs' directories."""

    def __init__(self, kubeconfig: str, root: Path) -> None:
        self.name = f"e2e-{uuid.uuid4().hex[:8]}"
        self.kubeconfig = kubeconfig
        self.log_path = root / "process-node.log"
        self.state_dir = root / "state"
        self.kubectl = Kubectl(kubeconfig)
        self.proc: subprocess.Popen | None = None

    @property
    def placement(self) -> dict:
        return {"nodeSelector": {"kubernetes.io/hostname": self.name},
                "tolerations": [{"key": TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}]}

    def start(self) -> "ProcessNode":
        env = {**os.environ, "PYTHONPATH": str(REPO / "hack")}
        env.pop("KUBECONFIG", None)
        cmd = [sys.executable, "-m", "process_node", "--kubeconfig", self.kubeconfig, "--node-name", self.name,
               "--state-dir", str(self.state_dir), "--log-file", str(self.log_path),
               "--taint", f"{TAINT_KEY}=true:NoSchedule", "--heartbeat-seconds", "5", "--shutdown-grace-seconds", "5"]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(self._ready, 30, what=f"process node {self.name} Ready")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"process node exited {self.proc.returncode}; log: {self.log_path}")
        node = self.kubectl.get("node", self.name) or {}
        return any(c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions", []))

    def container_log(self, namespace: str, pod_prefix: str) -> str:
        logs = sorted((self.state_dir / "logs").glob(f"{namespace}_{pod_prefix}*/*.log"))
        return "\n".join(p.read_text(errors="replace") for p in logs)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def process_node(kubeconfig: str, tmp_path: Path, request):
    node = ProcessNode(kubeconfig, tmp_path).start()
    yield node
    node.stop()
    node.kubectl("delete", "node", node.name, "--ignore-not-found", "--wait=false", check=False)
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"\n----- process node log ({node.log_path}) -----\n{node.log_path.read_text()[-6000:]}")
