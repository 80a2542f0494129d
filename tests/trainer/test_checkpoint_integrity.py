"""Checkpoints are signed with the job's key, and nothing of one is unpickled unless its manifest
verifies: a tampered, extended, unsigned or foreign-signed checkpoint is refused (the run starts
from scratch, or from an older valid one) and a payload planted in it never runs."""

import hashlib
import json
import pickle
import secrets
import shutil

import pytest

from trainer_helpers import arithmetic_chat, assert_ok, make_config, read_progress, run_trainer, write_config, write_jsonl

import torch
import deepspeed  # noqa: F401  (a broken install fails, never skips)

from finetune_trainer import checkpoint_integrity as integrity  # noqa: E402

SETTINGS = {"training.maxSteps": 8, "training.epochs": 1, "checkpointing.everySteps": 4, "checkpointing.keep": 2}
STEP = "step-00000004"


class Planted:
    """Unpickling it creates a file: proof that the trainer ran code from the checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path, marker):
    with open(path, "wb") as f:
        pickle.dump(Planted(marker), f)


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """One run with a key: it leaves a signed checkpoint at step 4 (and result.json)."""
    tmp = tmp_path_factory.mktemp("signed")
    dataset = write_jsonl(tmp / "train.jsonl", arithmetic_chat(24))
    key = secrets.token_bytes(32)
    (tmp / "key").write_bytes(key)
    config = config_for(tmp, dataset, "original", key)
    assert_ok(run_trainer(config))
    return tmp, dataset, key


def config_for(tmp, dataset, name, key=None, key_sha256=None):
    extra = {}
    if key is not None:
        extra["checkpointing.keyFile"] = str(tmp / "key")
        extra["checkpointing.keySha256"] = key_sha256 or hashlib.sha256(key).hexdigest()
    config = make_config(tmp, dataset, **SETTINGS, **extra, **{
        "output.dir": str(tmp / name), "reporting.progressFile": str(tmp / f"{name}.jsonl")})
    return write_config(tmp, config, f"{name}.json")


def copy_run(tmp, name):
    """A copy of the signed run's output (the same job, so the same fingerprint)."""
    shutil.copytree(tmp / "original", tmp / name)
    (tmp / name / "result.json").unlink()
    return tmp / name / "checkpoints" / STEP


def started(tmp, name):
    return [r for r in read_progress(tmp / f"{name}.jsonl") if r["event"] == "started"]


def test_a_checkpoint_is_signed_over_every_file(signed):
    tmp, _, key = signed
    checkpoint = tmp / "original" / "checkpoints" / STEP
    manifest = json.loads((checkpoint / integrity.MANIFEST).read_text())
    assert manifest["signature"]
    on_disk = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {integrity.MANIFEST}
    assert "trainer_state.json" in manifest["files"] and any(f.startswith("state/") for f in manifest["files"])
    integrity.verify(checkpoint, key)
    with pytest.raises(integrity.Untrusted, match="signature"):
        integrity.verify(checkpoint, secrets.token_bytes(32))


def test_a_valid_checkpoint_resumes(signed):
    tmp, dataset, key = signed
    copy_run(tmp, "valid")
    result = run_trainer(config_for(tmp, dataset, "valid", key))
    assert_ok(result)
    assert [(s["step"], s["resumed"]) for s in started(tmp, "valid")] == [(4, True)]
    assert "its signature verified" in result.stderr


def test_a_planted_pickle_is_refused_and_never_unpickled(signed, tmp_path):
    tmp, dataset, key = signed
    checkpoint = copy_run(tmp, "planted")
    # The payload is real: unpickling it the way DeepSpeed loads (weights_only=False) runs it.
    probe = tmp_path / "probe"
    plant(tmp_path / "probe.pt", probe)
    with pytest.raises(Exception):
        torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists()

    marker = tmp_path / "pwned"
    for target in [p for p in (checkpoint / "state").rglob("*.pt")] + [checkpoint / "rng-rank0.pt"]:
        plant(target, marker)
    result = run_trainer(config_for(tmp, dataset, "planted", key))
    assert_ok(result)
    assert not marker.exists(), "the trainer unpickled a tampered checkpoint"
    assert [(s["step"], s["resumed"]) for s in started(tmp, "planted")] == [(0, False)]
    assert f"not resuming from checkpoint {checkpoint}: changed files" in result.stderr
    assert "starting from scratch" in result.stderr


def test_an_extra_file_is_refused(signed):
    tmp, dataset, key = signed
    checkpoint = copy_run(tmp, "extra")
    (checkpoint / "state" / "extra.pt").write_bytes(b"x")
    result = run_trainer(config_for(tmp, dataset, "extra", key))
    assert_ok(result)
    assert [(s["step"], s["resumed"]) for s in started(tmp, "extra")] == [(0, False)]
    assert "extra files: state/extra.pt" in result.stderr


def test_verification_refuses_missing_manifest_forged_signature_missing_file_and_links(signed, tmp_path):
    tmp, _, key = signed
    original = tmp / "original" / "checkpoints" / STEP

    def fresh(name):
        return shutil.copytree(original, tmp_path / name)

    c = fresh("no-manifest")
    (c / integrity.MANIFEST).unlink()
    with pytest.raises(integrity.Untrusted, match="no manifest"):
        integrity.verify(c, key)

    c = fresh("forged")  # a writer of the claim re-hashes the files but cannot sign without the key
    plant(c / "rng-rank0.pt", tmp_path / "pwned")
    integrity.write_manifest(c, secrets.token_bytes(32))
    with pytest.raises(integrity.Untrusted, match="signature"):
        integrity.verify(c, key)
    integrity.write_manifest(c, None)
    with pytest.raises(integrity.Untrusted, match="unsigned"):
        integrity.verify(c, key)

    c = fresh("missing")
    (c / "rng-rank0.pt").unlink()
    with pytest.raises(integrity.Untrusted, match="missing files: rng-rank0.pt"):
        integrity.verify(c, key)

    c = fresh("link")
    target = c / "rng-rank0.pt"
    shutil.move(target, tmp_path / "elsewhere.pt")
    target.symlink_to(tmp_path / "elsewhere.pt")
    with pytest.raises(integrity.Untrusted, match="not a regular file"):
        integrity.verify(c, key)
    assert not (tmp_path / "pwned").exists()


def test_falls_back_to_an_older_valid_checkpoint(signed, tmp_path):
    tmp, dataset, key = signed
    copy_run(tmp, "older")
    root = tmp / "older" / "checkpoints"
    newer = shutil.copytree(root / STEP, root / "step-00000006")
    plant(newer / "rng-rank0.pt", tmp_path / "pwned")
    result = run_trainer(config_for(tmp, dataset, "older", key))
    assert_ok(result)
    assert not (tmp_path / "pwned").exists()
    assert [(s["step"], s["resumed"]) for s in started(tmp, "older")] == [(4, True)]
    assert "not resuming from checkpoint" in result.stderr and "step-00000006" in result.stderr


def test_a_replaced_key_is_refused(signed):
    """The operator's keySha256 names the key it generated: a Secret someone replaced (with a
    key they know) is refused before anything is read or written."""
    tmp, dataset, key = signed
    copy_run(tmp, "replaced")
    result = run_trainer(config_for(tmp, dataset, "replaced", key, key_sha256=hashlib.sha256(b"other").hexdigest()))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "is not the key the operator created for this job" in result.stderr
    assert not (tmp / "replaced.jsonl").exists() or not started(tmp, "replaced")


def test_without_a_key_checkpoints_resume_unverified(signed):
    tmp, dataset, _ = signed
    copy_run(tmp, "unkeyed")
    result = run_trainer(config_for(tmp, dataset, "unkeyed"))
    assert_ok(result)
    assert [(s["step"], s["resumed"]) for s in started(tmp, "unkeyed")] == [(4, True)]
    assert "are not verified: no checkpointing.keyFile is configured" in result.stderr
