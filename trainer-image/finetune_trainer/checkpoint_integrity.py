"""Signed checkpoints: nothing in a checkpoint is unpickled unless this job wrote it.

Resuming hands DeepSpeed's and torch's files to `torch.load`, which unpickles them
(DeepSpeed loads with weights_only=False): whoever can write the checkpoint directory (anyone
who can write the output claim) could otherwise run code in the trainer. So every complete
checkpoint carries a manifest, written last by rank 0 once every process's shard is in place:
each file's relative path and SHA-256, and an HMAC-SHA256 over that list, keyed with the
job's checkpoint key. The key comes from a Secret the operator creates for the job and mounts
read-only into the trainer pods only (checkpointing.keyFile); the operator also puts the key's
SHA-256 into the trainer config (checkpointing.keySha256), which the job controls, so a key
Secret that someone replaced is refused rather than trusted (docs/outputs.md).

A checkpoint is trusted only if its manifest's signature is right AND the files on disk are
exactly the files it lists (no extra, missing, changed, symlinked or special files). One that
is not is never loaded: the trainer logs why and falls back to an older valid checkpoint, or
starts from scratch.

Without a key (local runs, `kubectl finetune run --local`, tests) checkpoints are written with
an unsigned manifest and resumed as before, with a warning that they are unverified.

Residual risk: the files are verified and then read again by DeepSpeed; a writer of the claim
who swaps a file in between (a race against the trainer's start) is not caught.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import stat
from pathlib import Path

from finetune_trainer.errors import ConfigError

log = logging.getLogger(__name__)

MANIFEST = "checkpoint-manifest.json"
VERSION = 1
_CHUNK = 1 << 20


class Untrusted(Exception):
    """A checkpoint that must not be loaded; the message says why."""


def load_key(key_file: str | None, key_sha256: str | None) -> bytes | None:
    """The job's checkpoint key, or None when none is configured (unsigned checkpoints).

    With keySha256 set (the operator sets it), a key file whose digest differs is refused: the
    Secret was replaced after the operator created it, and a key someone else knows would let
    them forge checkpoints."""
    if key_file is None:
        if key_sha256 is not None:
            raise ConfigError("checkpointing.keySha256: set without checkpointing.keyFile")
        return None
    try:
        key = Path(key_file).read_bytes()
    except OSError as exc:
        raise ConfigError(f"checkpointing.keyFile: {key_file}: {exc.strerror}") from None
    if len(key) < 16:
        raise ConfigError(f"checkpointing.keyFile: {key_file} holds {len(key)} bytes; a key needs at least 16")
    if key_sha256 is not None and not hmac.compare_digest(hashlib.sha256(key).hexdigest(), key_sha256):
        raise ConfigError(
            f"checkpointing.keyFile: {key_file} is not the key the operator created for this job (its SHA-256 "
            "differs from checkpointing.keySha256): the key Secret was replaced; checkpoints are neither "
            "written nor resumed with it"
        )
    return key


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(checkpoint: Path) -> dict[str, str]:
    """{relative posix path: sha256} of every file under `checkpoint` but the manifest.

    Only directories and regular files are allowed: a symlink or special file is Untrusted
    (a link could point anywhere, and its target could change after it was hashed)."""
    files: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(checkpoint, followlinks=False):
        here = Path(dirpath)
        for name in sorted(dirnames + filenames):
            path = here / name
            mode = os.lstat(path).st_mode
            rel = path.relative_to(checkpoint).as_posix()
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise Untrusted(f"{rel} is not a regular file")
            if rel == MANIFEST:
                continue
            files[rel] = _file_digest(path)
    return files


def _canonical(files: dict[str, str]) -> bytes:
    """The signed bytes: the version and every (path, digest), sorted by path."""
    return json.dumps({"version": VERSION, "files": sorted(files.items())}, separators=(",", ":")).encode()


def _signature(key: bytes, files: dict[str, str]) -> str:
    return hmac.new(key, _canonical(files), hashlib.sha256).hexdigest()


def write_manifest(checkpoint: Path, key: bytes | None) -> None:
    """Hash every file of the (complete) checkpoint and write the manifest, signed with `key`
    (unsigned without one), fsynced. Call it after every file of the checkpoint is written."""
    files = list_files(checkpoint)
    manifest = {"version": VERSION, "files": files, "signature": _signature(key, files) if key else None}
    with open(checkpoint / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def verify(checkpoint: Path, key: bytes) -> None:
    """Raise Untrusted unless the checkpoint is exactly what this job's key signed."""
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text())
    except FileNotFoundError:
        raise Untrusted("it has no manifest") from None
    except (OSError, ValueError) as exc:
        raise Untrusted(f"its manifest cannot be read: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("version") != VERSION:
        raise Untrusted("its manifest is not a version-1 manifest")
    signature = manifest.get("signature")
    listed = manifest.get("files")
    if not isinstance(signature, str) or not signature:
        raise Untrusted("its manifest is unsigned")
    if not isinstance(listed, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in listed.items()):
        raise Untrusted("its manifest's file list is malformed")
    # The signature covers the list; the list must then match the disk exactly.
    if not hmac.compare_digest(_signature(key, listed), signature):
        raise Untrusted("its manifest's signature is wrong (not written with this job's key)")
    actual = list_files(checkpoint)
    extra = sorted(set(actual) - set(listed))
    missing = sorted(set(listed) - set(actual))
    changed = sorted(p for p in set(actual) & set(listed) if not hmac.compare_digest(actual[p], listed[p]))
    problems = [f"{what}: {', '.join(paths[:5])}" for what, paths in
                (("extra files", extra), ("missing files", missing), ("changed files", changed)) if paths]
    if problems:
        raise Untrusted("; ".join(problems))
