"""A volumeMount's subPath on the process node: created when missing, never outside its volume
(a symlink in the claim must not hand the container the node's files), as with the kubelet."""

from __future__ import annotations

import pytest

from process_node import volumes


def test_a_missing_subpath_is_created_inside_the_volume(tmp_path):
    volume = tmp_path / "claim"
    volume.mkdir()
    made = volumes.sub_path(volume, "jobs/./run-1/")
    assert made == (volume / "jobs" / "run-1").resolve() and made.is_dir()
    assert volumes.sub_path(volume, "jobs/run-1") == made  # and found again


def test_symlinks_inside_the_volume_are_followed(tmp_path):
    volume = tmp_path / "claim"
    (volume / "real").mkdir(parents=True)
    (volume / "alias").symlink_to("real")
    assert volumes.sub_path(volume, "alias/out") == (volume / "real" / "out").resolve()


@pytest.mark.parametrize("link", ["escape", "escape/deeper"])
def test_a_subpath_through_a_symlink_out_of_the_volume_is_refused(tmp_path, link):
    volume, outside = tmp_path / "claim", tmp_path / "node-files"
    volume.mkdir()
    outside.mkdir()
    (volume / "escape").symlink_to(outside)
    with pytest.raises(volumes.VolumeError, match="leads outside the volume"):
        volumes.sub_path(volume, link)
    assert list(outside.iterdir()) == []  # nothing was created out there


def test_a_dangling_symlink_is_not_followed_by_mkdir(tmp_path):
    volume = tmp_path / "claim"
    volume.mkdir()
    (volume / "out").symlink_to(tmp_path / "would-be-created")
    with pytest.raises(volumes.VolumeError):
        volumes.sub_path(volume, "out")
    assert not (tmp_path / "would-be-created").exists()


@pytest.mark.parametrize("sub", ["/etc", "a/../../b"])
def test_absolute_and_parent_subpaths_are_refused(tmp_path, sub):
    with pytest.raises(ValueError):
        volumes.sub_path(tmp_path, sub)


# --- on a running process node, against the real control plane --------------------------------

def _waiting(kubectl, name: str) -> dict | None:
    p = kubectl.get("pod", name)
    statuses = (p or {}).get("status", {}).get("containerStatuses") or []
    waiting = statuses[0].get("state", {}).get("waiting") if statuses else None
    return waiting if waiting and waiting.get("reason") == "CreateContainerConfigError" else None


@pytest.mark.integration
def test_a_pod_mounts_only_its_subpath_and_never_one_that_leads_out(process_node, kubectl, namespace, tmp_path):
    from kubetools import wait_for
    from test_process_node import pod, pvc_bound_to_host_dir, terminated

    data, outside = process_node.data_dir, tmp_path / "node-files"
    (data / "other-job").mkdir(parents=True)
    (data / "other-job" / "result.json").write_text("{}")
    outside.mkdir()
    (data / "escape").symlink_to(outside)
    pvc_bound_to_host_dir(kubectl, namespace, "data", data)
    volumes_ = [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]

    script = """
        import os
        assert os.listdir("/mnt/output") == [], os.listdir("/mnt/output")   # not the rest of the claim
        open("/mnt/output/adapter.bin", "w").write("mine")
    """
    ok = pod("writer", process_node.name, script,
             volumeMounts=[{"name": "data", "mountPath": "/mnt/output", "subPath": "jobs/run-1"}])
    ok["spec"]["volumes"] = volumes_
    kubectl.create(ok)
    state = terminated(kubectl, "writer")["status"]["containerStatuses"][0]["state"]["terminated"]
    assert state["exitCode"] == 0, state
    assert (data / "jobs" / "run-1" / "adapter.bin").read_text() == "mine"

    bad = pod("escaper", process_node.name, "open('/mnt/output/x', 'w').write('leak')",
              volumeMounts=[{"name": "data", "mountPath": "/mnt/output", "subPath": "escape/deeper"}])
    bad["spec"]["volumes"] = volumes_
    kubectl.create(bad)
    waiting = wait_for(lambda: _waiting(kubectl, "escaper"), 30, what="escaper to wait in CreateContainerConfigError")
    assert "leads outside the volume" in waiting["message"], waiting
    assert list(outside.iterdir()) == []  # neither the subPath nor the file was made out there
