"""Fixtures for the process node: the program itself as a subprocess, one node per test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from kubetools import REPO, Kubectl, wait_for

HACK = REPO / "hack"
if str(HACK) not in sys.path:
    sys.path.insert(0, str(HACK))


class ProcessNode:
    """`python -m process_node` for one test, logging under the test's tmp_path."""

    def __init__(self, kubeconfig: str, root: Path) -> None:
        self.name = f"pn-{uuid.uuid4().hex[:8]}"
        self.kubeconfig = kubeconfig
        self.state_dir = root / "state"
        self.data_dir = root / "data"          # where PVC `data` lives (--volume data=...)
        self.log_path = root / "process-node.log"
        self.kubectl = Kubectl(kubeconfig)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ProcessNode":
        env = {**os.environ, "PYTHONPATH": str(HACK)}
        cmd = [sys.executable, "-m", "process_node", "--kubeconfig", self.kubeconfig, "--node-name", self.name,
               "--state-dir", str(self.state_dir), "--volume", f"data={self.data_dir}",
               "--log-file", str(self.log_path), "--heartbeat-seconds", "2", "--shutdown-grace-seconds", "2",
               "--restart-backoff-seconds", "1"]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        wait_for(self._ready, 30, what=f"node {self.name} Ready")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"process node exited {self.proc.returncode}: {self.proc.stderr.read().decode()}")
        node = self.kubectl.get("node", self.name)
        conditions = {c["type"]: c["status"] for c in (node or {}).get("status", {}).get("conditions", [])}
        return conditions.get("Ready") == "True"

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: no chance to clean up (containers die through their parent-death signal)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    @property
    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


@pytest.fixture
def process_node(kubeconfig: str, tmp_path: Path, request):
    node = ProcessNode(kubeconfig, tmp_path).start()
    yield node
    node.stop()
    node.kubectl("delete", "node", node.name, "--ignore-not-found", "--wait=false", check=False)
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"\n----- process node log ({node.log_path}) -----\n{node.log[-8000:]}")
