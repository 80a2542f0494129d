"""`make push` against a real OCI registry (go-containerregistry's, built from its module and
listening on loopback): both images arrive with the digests they were built with, which are the
images the rest of the suite ran."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest

from kubetools import CACHE, REPO

pytestmark = pytest.mark.integration
REGISTRY = CACHE / "bin" / "registry"


@pytest.fixture
def registry(tmp_path: Path):
    if not REGISTRY.exists():
        pytest.fail(f"no registry at {REGISTRY}: run `hack/build-binaries.sh registry` (make test does)")
    log = open(tmp_path / "registry.log", "w")
    proc = subprocess.Popen([str(REGISTRY)], stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    try:
        address = proc.stdout.readline().strip()
        assert re.fullmatch(r"127\.0\.0\.1:\d+", address), address
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
        log.close()


def _built_digests() -> dict[str, str]:
    """name -> the manifest digest inside each image's OCI archive (what containerd imported)."""
    env = dict(line.split("=", 1) for line in (CACHE / "images" / "current.env").read_text().splitlines()
               if "=" in line and not line.startswith("#"))
    out = {}
    for which in ("OPERATOR", "TRAINER"):
        with tarfile.open(env[f"{which}_IMAGE_ARCHIVE"]) as archive:
            index = json.load(archive.extractfile("index.json"))
        name = env[f"{which}_IMAGE"].rsplit("/", 1)[-1].split(":")[0]
        out[name] = index["manifests"][0]["digest"]
    return out


def _push(address: str, tag: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "REGISTRY": f"{address}/fto", "TAG": tag, "PUSH_TLS_VERIFY": "false"}
    return subprocess.run(["make", "-s", "push", f"REGISTRY={address}/fto", f"TAG={tag}", "PUSH_TLS_VERIFY=false"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_push_sends_both_images_with_their_built_digests(registry: str) -> None:
    pushed = _push(registry, "e2e")
    assert pushed.returncode == 0, pushed.stderr
    lines = pushed.stdout.split()
    refs = dict(re.fullmatch(rf"{re.escape(registry)}/fto/([a-z-]+):e2e@(sha256:[0-9a-f]{{64}})", line).groups()
                for line in lines)
    assert refs == _built_digests(), (lines, _built_digests())
    # The registry serves them under those digests (asked directly, not through the push tool).
    for name, digest in refs.items():
        inspected = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw",
                                    f"docker://{registry}/fto/{name}:e2e"], capture_output=True, timeout=60)
        assert inspected.returncode == 0, inspected.stderr
        assert "sha256:" + hashlib.sha256(inspected.stdout).hexdigest() == digest, name
    # Again, under another tag: the same digests (nothing rebuilt, nothing converted).
    again = _push(registry, "e2e-again")
    assert again.returncode == 0, again.stderr
    assert sorted(line.split("@")[1] for line in again.stdout.split()) == sorted(refs.values())


def test_push_without_a_registry_says_how() -> None:
    proc = subprocess.run(["make", "-s", "push"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "REGISTRY"})
    assert proc.returncode != 0 and "set REGISTRY, e.g. make push REGISTRY=" in proc.stderr, proc.stderr
