"""The release workflow (.github/workflows/release.yml) cannot run here (no CI host, no registry):
actionlint, built from its module like the other tools, checks it as GitHub would read it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from kubetools import CACHE, REPO

ACTIONLINT = CACHE / "bin" / "actionlint"
WORKFLOW = REPO / ".github" / "workflows" / "release.yml"


def lint(path: Path) -> subprocess.CompletedProcess:
    if not ACTIONLINT.exists():
        pytest.fail(f"no actionlint at {ACTIONLINT}: run `hack/build-binaries.sh actionlint` (make test does)")
    # -shellcheck= : the same verdict on every machine, whether or not shellcheck is installed.
    return subprocess.run([str(ACTIONLINT), "-shellcheck=", "-no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_actionlint_accepts_the_release_workflow_and_refuses_a_broken_one(tmp_path):
    proc = lint(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = tmp_path / "release.yml"
    broken.write_text(WORKFLOW.read_text().replace("needs.version.outputs.version", "needs.version.outputs.versoin", 1))
    proc = lint(broken)
    assert proc.returncode == 1 and "versoin" in proc.stdout, proc.stdout + proc.stderr


def test_it_builds_each_architecture_natively_pushes_with_make_push_and_joins_them():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    jobs = workflow["jobs"]
    arches = {entry["arch"]: entry["runner"] for entry in jobs["images"]["strategy"]["matrix"]["include"]}
    assert set(arches) == {"amd64", "arm64"} and arches["arm64"].endswith("-arm")
    steps = " ".join(step.get("run", "") for step in jobs["images"]["steps"])
    assert "hack/images.sh operator trainer verify" in steps and "make push" in steps
    index = " ".join(step.get("run", "") for step in jobs["index"]["steps"])
    assert "buildah manifest push --all" in index
    # Least privilege: only the jobs that push may write packages.
    assert workflow["permissions"] == {"contents": "read"}
    writers = {name for name, job in jobs.items() if job.get("permissions", {}).get("packages") == "write"}
    assert writers == {"images", "index", "chart"}
    # The token reaches commands through the environment and stdin, never a command line.
    for job in jobs.values():
        for step in job["steps"]:
            assert "secrets." not in step.get("run", ""), step
