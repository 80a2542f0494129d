"""Fixtures for the process node: the program itself as a subprocess, one node per test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kubetools import CLUSTER_DNS, REPO, ProcessNode

HACK = REPO / "hack"
if str(HACK) not in sys.path:
    sys.path.insert(0, str(HACK))


@pytest.fixture
def process_node(kubeconfig: str, tmp_path: Path, request):
    data_dir = tmp_path / "data"  # where PVC `data` lives
    node = ProcessNode(kubeconfig, tmp_path, "pn", ["--volume", f"data={data_dir}", "--heartbeat-seconds", "2",
                                                    "--shutdown-grace-seconds", "2", "--restart-backoff-seconds", "1",
                                                    "--cluster-dns", CLUSTER_DNS,
                                                    # two GPUs that exist only by name: handed out, never opened
                                                    "--device", "nvidia.com/gpu=3,5"])
    node.data_dir = data_dir
    node.start()
    yield node
    node.stop()
    node.delete()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"\n----- process node log ({node.log_path}) -----\n{node.log[-8000:]}")
