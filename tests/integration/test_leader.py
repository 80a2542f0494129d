"""Leader election for real: a leader whose Lease another replica takes over exits (non-zero,
so its pod restarts as a candidate) and stops acting; the new leader carries on."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from test_operator import job_manifest

from kubetools import OperatorProcess, wait_for

pytestmark = pytest.mark.usefixtures("claims")


def test_a_leader_that_loses_its_lease_exits_and_acts_no_more(kubeconfig, namespace, kubectl, tmp_path):
    first = OperatorProcess(kubeconfig, namespace, tmp_path / "first.log", identity="first").start()
    try:
        first.wait_leading()
        kubectl.create(job_manifest("before"))
        wait_for(lambda: kubectl.get("job", "before-trainer"), 30, what="the first leader to act")
        # Another replica takes the Lease (as one does once it sees the Lease expire).
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        kubectl.merge_patch("lease", "finetune-operator", {"spec": {"holderIdentity": "second", "renewTime": now,
                                                                      "acquireTime": now, "leaseDurationSeconds": 3600}})
        code = wait_for(lambda: first.proc.poll(), 30, what="the old leader to exit")
        assert code == 1
        assert "leadership taken over by another replica" in first.log
        # The new leader takes over the work.
        kubectl.create(job_manifest("after"))
        second = OperatorProcess(kubeconfig, namespace, tmp_path / "second.log", identity="second").start()
        try:
            second.wait_leading()  # the Lease is its own: it leads at once
            wait_for(lambda: kubectl.get("job", "after-trainer"), 30, what="the new leader to act")
        finally:
            second.stop()
    finally:
        first.stop()
